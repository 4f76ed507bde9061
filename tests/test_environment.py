"""The pinned CPU stack: no CUDA build of torch, and torch-fidelity importable (torchvision fix)."""


def test_cpu_torch_and_torch_fidelity_import():
    import torch
    import torch_fidelity
    import torchvision

    assert torch.__version__.startswith("2.13.0") and torch.version.cuda is None
    assert torchvision.__version__.startswith("0.28.0")
    assert hasattr(torch_fidelity, "calculate_metrics")
