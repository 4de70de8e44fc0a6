import importlib.util

import grpo_fast


def test_kernels_installs_under_grpo_fast_only():
    assert importlib.util.find_spec("grpo_fast.kernels") is not None
    assert importlib.util.find_spec("kernels") is None or "grpo_fast" not in str(
        importlib.util.find_spec("kernels").origin
    )


def test_public_api_names():
    for name in ("selective_log_softmax", "group_advantages", "grpo_loss"):
        assert callable(getattr(grpo_fast, name))
