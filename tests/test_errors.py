"""The one count check (surgery.errors.check_count) and the messages of its callers."""
import pytest

from surgery.errors import PromptError, SurgeryError, check_count


@pytest.mark.parametrize("value", [0, -1, 1.5, "3", True, None])
def test_check_count_refuses_anything_but_a_positive_int(value):
    with pytest.raises(SurgeryError, match=r"^--k must be a positive integer, got "):
        check_count(value, "--k")


def test_check_count_minimum_and_error_class():
    check_count(0, "n", minimum=0)
    check_count(7, "n")
    with pytest.raises(PromptError, match=r"^n must be an integer >= 0, got -1$"):
        check_count(-1, "n", minimum=0, error=PromptError)


def test_callers_name_the_option():
    from surgery.prompts import builtin, load_prompts
    from surgery.sae.train import check_schedule, check_sizes
    from surgery.training.harden import LoraSFT
    from surgery.training.sails import Sails
    from surgery.training.trainer import TrainConfig

    cases = [(lambda: Sails(k_features=0), r"--k-features must be a positive integer, got 0"),
             (lambda: Sails(response_tokens=True), r"SAILS response_tokens must be a positive integer, got True"),
             (lambda: LoraSFT(rank=1.5), r"LoRA rank \(--rank\) must be a positive integer, got 1.5"),
             (lambda: TrainConfig(eval_every=0).check(), r"eval_every \(--eval-every\) must be a positive integer"),
             (lambda: TrainConfig(epochs=False).check(), r"epochs \(--epochs\) must be a positive integer, got False"),
             (lambda: builtin("harmful").subset(0), r"subset size \(source builtin:harmful\) must be a positive"),
             (lambda: load_prompts("builtin:harmful", limit=0), r"limit must be a positive integer, got 0"),
             (lambda: check_sizes(0, 4), r"d_sae must be a positive integer, got 0"),
             (lambda: check_schedule(0, None, 8, None), r"steps \(--steps\) must be a positive integer, got 0")]
    for make, match in cases:
        with pytest.raises(SurgeryError, match=match):
            make()
    TrainConfig(max_steps=None, eval_every=None).check()  # None: no limit
