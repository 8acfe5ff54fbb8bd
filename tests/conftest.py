import os
import random
import zlib

import pytest
import torch

# Fresh random inputs on every run; PYOPS_TEST_SEED=<n> replays one.
SEED = int(os.environ.get("PYOPS_TEST_SEED", random.SystemRandom().randrange(2**31)))


def pytest_report_header(config):
    return f"pyops test seed: {SEED} (replay with PYOPS_TEST_SEED={SEED})"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(SEED + (zlib.crc32(request.node.nodeid.encode()) % 100_000))
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    """Tests marked `slow` (minutes: e.g. a Flower simulation on Ray) run only with PYOPS_SLOW_TESTS=1."""
    if os.environ.get("PYOPS_SLOW_TESTS"):
        return
    skip = pytest.mark.skip(reason="slow: run with PYOPS_SLOW_TESTS=1 (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def sgd_step_args(output_dir, accumulation: int, batch: int, **kw):
    """``transformers.TrainingArguments`` of one plain SGD step at learning rate 1 (no momentum,
    weight decay, schedule or clipping) over ``batch`` examples in ``accumulation`` micro-batches,
    on the CPU, saving and logging nothing: the step moves the parameters by minus the accumulated
    gradient (the Trainer accumulation tests). ``kw`` adds or overrides arguments."""
    import transformers

    args = dict(
        output_dir=str(output_dir),
        max_steps=1,
        gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=batch // accumulation,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        remove_unused_columns=False,
        optim="sgd",
        learning_rate=1.0,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    return transformers.TrainingArguments(**{**args, **kw})
