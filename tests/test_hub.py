"""Finding a checkpoint: a missing local folder is named as such, not sent to the Hub as an id."""

import huggingface_hub
import pytest

from dla_shared.hub import resolve


@pytest.mark.parametrize("name", ["./nowhere", "/no/such/folder", "runs/a/b/model", "~/model"])
def test_a_missing_path_is_no_such_folder(name):
    with pytest.raises(FileNotFoundError, match=r"no such folder: .* \(and it is not a Hub repository id\)"):
        resolve(name)


def test_a_hub_id_that_cannot_be_fetched_names_both_possibilities(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"'someone/model' is not a local folder, and the Hub repository "
                                                r"'someone/model' could not be fetched "
                                                r"\(ConnectionError: no network\)"):
        resolve("someone/model")
