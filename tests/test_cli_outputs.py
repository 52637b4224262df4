"""Every command line refuses, before any work, an output file it could not write where asked (a folder, a
missing folder, a picture name without a picture suffix, to which matplotlib would add ``.png`` and so write
another file), and options that would have no effect; each names the argument."""

import re

import pytest

from dla_mlx.generate import main as generate_cli
from dla_shared.demo import main as demo_cli
from dla_torch.evaluate import main as eval_cli
from dla_torch.inspect import main as inspect_cli

# command: (its main, the arguments before the output option); the model and data need not exist, since
# nothing is loaded before the check
COMMANDS = {"dla-generate": (generate_cli, ["--prompt", "x"]),
            "dla-inspect": (inspect_cli, ["no-model", "--data", "no-data.txt"]),
            "dla-eval": (eval_cli, ["--model", "no-model", "--data", "no-data.txt"]),
            "dla-demo": (demo_cli, [])}
OUTPUTS = [("dla-generate", "--boundaries", True), ("dla-inspect", "--png", True), ("dla-inspect", "--json", False),
           ("dla-eval", "--json", False), ("dla-demo", "--plot", True), ("dla-demo", "--json", False)]
PATHS = {"a-folder": (lambda tmp: tmp, "is a folder; expected a file name"),
         "in-a-missing-folder": (lambda tmp: tmp / "nope" / "out.png", "the folder .*nope' does not exist"),
         "no-suffix": (lambda tmp: tmp / "picture", r"must end in one of \.png, \.pdf"),
         "a-text-suffix": (lambda tmp: tmp / "picture.txt", r"must end in one of \.png, \.pdf")}
FILE_PATHS = ("a-folder", "in-a-missing-folder")  # what a non-picture output is checked for
CASES = [pytest.param(command, option, path, id=f"{command}-{option[2:]}-{path}")
         for command, option, figure in OUTPUTS for path in PATHS if figure or path in FILE_PATHS]


@pytest.mark.parametrize("command, option, path", CASES)
def test_a_bad_output_path_is_refused_first(command, option, path, tmp_path, capsys):
    main, args = COMMANDS[command]
    make_path, message = PATHS[path]
    with pytest.raises(SystemExit) as exit_:
        main([*args, option, str(make_path(tmp_path))])
    assert exit_.value.code == 2
    assert re.search(f"{option} .*{message}", capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command, args, message", [
    ("dla-generate", ["--boundaries-layer", "1"], "--boundaries-layer and --boundaries-head choose what --boundaries"),
    ("dla-inspect", ["--head", "1"], "--layer and --head choose what --text shows"),
    ("dla-demo", ["--seeds", "0"], "--seeds must be a positive integer, got 0"),
    ("dla-demo", ["--segments", "0"], "--segments must be a positive integer, got 0"),
], ids=["generate-layer-without-boundaries", "inspect-head-without-text", "demo-no-seeds", "demo-no-segments"])
def test_an_option_that_would_do_nothing_is_refused(command, args, message, capsys):
    main, before = COMMANDS[command]
    with pytest.raises(SystemExit) as exit_:
        main([*before, *args])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
