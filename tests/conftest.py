import os

import pytest
import torch
from hypothesis import settings

# Without CUDA, Triton kernels run on the CPU in Triton's interpreter (set before any kernel is defined).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# CI runs the same examples every time, so a red run can be reproduced; local runs keep exploring.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def hf_mamba2(tmp_path_factory):
    """A random tiny transformers Mamba-2 (norms and D perturbed so every parameter matters), saved."""
    from transformers import Mamba2Config, Mamba2ForCausalLM  # here: most test modules need no transformers

    torch.manual_seed(0)
    config = Mamba2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, state_size=8, expand=2, head_dim=8,
                          num_heads=8, n_groups=2, conv_kernel=4, chunk_size=16)
    model = Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".D"):
                p.add_(0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("mamba2")
    model.save_pretrained(folder)
    return model, folder
