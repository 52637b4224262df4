"""The ``model_file`` of DLA's MLX checkpoint folders: `dla-convert` copies this file into every MLX folder it
writes (as ``dla_model.py``) and names it in config.json, so that mlx-lm's own tools (``mlx_lm.generate``,
``mlx_lm.server``, ``mlx_lm.chat``, ``mlx_lm.cache_prompt``) run the model with ``--trust-remote-code``.
The model itself is the installed ``dla`` package's; `dla_mlx.load` needs neither this file nor the flag."""

try:
    from dla_mlx.models import dla_gated_deltanet, dla_mamba2
except ImportError as error:
    raise ImportError("this model is a DLA model (Dynamic Linear Attention): install the `dla` package where it is "
                      "loaded (pip install dla)") from error

MODULES = {"dla_mamba2": dla_mamba2, "dla_gated_deltanet": dla_gated_deltanet}


class ModelArgs:
    """mlx-lm calls ``ModelArgs.from_dict(config)``; the config's model_type picks the model."""

    @staticmethod
    def from_dict(config: dict):
        if config.get("model_type") not in MODULES:
            raise ValueError(f"unknown model_type {config.get('model_type')!r}; expected one of {sorted(MODULES)}")
        return MODULES[config["model_type"]].ModelArgs.from_dict(config)


def Model(args):
    return MODULES[args.model_type].Model(args)
