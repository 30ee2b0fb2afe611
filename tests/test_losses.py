"""Policy losses and their aggregation, against hand-computed values."""

import math

import pytest
import torch

from forge.train.losses import LOSSES, VANISH_AT_ZERO_ADVANTAGE, LossConfig, aggregate_loss, compute_loss


def leaf(values):
    return torch.tensor(values, dtype=torch.float64, requires_grad=True)


def flat(tensor):
    return tensor.detach().flatten().tolist()


def run(name, logprobs, behaviour, advantages, mask, config=None, ref=None):
    config = config or LossConfig()
    return compute_loss(
        name,
        logprobs,
        torch.tensor(behaviour, dtype=torch.float64),
        torch.tensor(advantages, dtype=torch.float64),
        torch.tensor(mask, dtype=torch.float64),
        config,
        None if ref is None else torch.tensor(ref, dtype=torch.float64),
    )


def test_pg_is_minus_advantage_times_logprob_on_generated_tokens_only():
    lp = leaf([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    loss, _ = run("pg", lp, [[-9.0] * 3, [-9.0] * 3], [2.0, -1.0], [[1, 1, 0], [0, 1, 1]])
    assert flat(loss) == pytest.approx([2.0, 4.0, 0.0, 0.0, -0.5, -0.5])
    loss.sum().backward()
    assert flat(lp.grad) == pytest.approx([-2.0, -2.0, 0.0, 0.0, 1.0, 1.0])


def test_pg_with_tis_cap_weights_each_token_by_the_truncated_ratio():
    lp = leaf([[math.log(0.5), math.log(0.9)]])
    behaviour = [[math.log(0.25), math.log(0.9)]]  # ratios 2.0 and 1.0
    loss, metrics = run("pg", lp, behaviour, [1.0], [[1, 1]], LossConfig(tis_cap=1.5))
    assert loss.tolist()[0] == pytest.approx([-1.5 * math.log(0.5), -math.log(0.9)])
    loss.sum().backward()
    assert lp.grad.tolist()[0] == pytest.approx([-1.5, -1.0])  # the weight is stop-gradient
    assert metrics["tis_fraction"] == pytest.approx(0.5)


def test_ppo_clip_clips_the_ratio_in_the_direction_of_the_advantage():
    config = LossConfig(clip_low=0.2, clip_high=0.28)
    lp = leaf([[math.log(1.5), math.log(1.1), math.log(0.5), math.log(1.5)]])
    behaviour = [[0.0, 0.0, 0.0, 0.0]]  # ratios 1.5, 1.1, 0.5, 1.5
    advantages = [1.0]
    loss, metrics = run("ppo_clip", lp, behaviour, advantages, [[1, 1, 1, 1]], config)
    # A > 0: -min(r, clip(r)) = -1.28, -1.1, -0.5, -1.28
    assert loss.tolist()[0] == pytest.approx([-1.28, -1.1, -0.5, -1.28])
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    loss.sum().backward()
    # clipped tokens carry no gradient; unclipped ones d(-r)/dlogp = -r
    assert lp.grad.tolist()[0] == pytest.approx([0.0, -1.1, -0.5, 0.0])


def test_ppo_clip_clips_low_ratios_for_negative_advantages():
    lp = leaf([[math.log(0.5), math.log(2.0)]])
    loss, metrics = run("ppo_clip", lp, [[0.0, 0.0]], [-1.0], [[1, 1]], LossConfig(clip_low=0.2))
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)) -> 0.8 (clipped), 2.0 (unbounded)
    assert loss.tolist()[0] == pytest.approx([0.8, 2.0])
    assert metrics["clip_fraction"] == pytest.approx(0.5)


def test_tis_cap_bounds_the_ppo_ratio_for_negative_advantages():
    lp = leaf([[math.log(3.0), math.log(1.5)]])
    loss, metrics = run("ppo_clip", lp, [[0.0, 0.0]], [-1.0], [[1, 1]], LossConfig(tis_cap=2.0))
    assert loss.tolist()[0] == pytest.approx([2.0, 1.5])
    assert metrics["tis_fraction"] == pytest.approx(0.5)
    loss.sum().backward()
    assert lp.grad.tolist()[0] == pytest.approx([0.0, 1.5])


def test_cispo_clips_the_weight_but_keeps_the_gradient_of_every_token():
    config = LossConfig(cispo_clip_low=0.0, cispo_clip_high=2.0)
    lp = leaf([[math.log(3.0) - 1.0, math.log(0.5) - 1.0]])
    behaviour = [[-1.0, -1.0]]  # ratios 3.0 (clipped to 2.0) and 0.5
    loss, metrics = run("cispo", lp, behaviour, [1.0], [[1, 1]], config)
    assert loss.tolist()[0] == pytest.approx([-2.0 * (math.log(3.0) - 1.0), -0.5 * (math.log(0.5) - 1.0)])
    loss.sum().backward()
    assert lp.grad.tolist()[0] == pytest.approx([-2.0, -0.5])
    assert metrics["clip_fraction"] == pytest.approx(0.5)


def test_gspo_uses_one_geometric_mean_ratio_per_sequence():
    config = LossConfig(gspo_clip_low=0.5, gspo_clip_high=0.5)  # wide: nothing clipped
    lp = leaf([[math.log(2.0), math.log(0.5), 0.0], [math.log(4.0), 0.0, 0.0]])
    behaviour = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    mask = [[1, 1, 0], [1, 0, 0]]
    loss, metrics = run("gspo", lp, behaviour, [1.0, -0.25], mask, config)
    # sequence 0: exp(mean(log 2, log 0.5)) = 1 ; sequence 1: ratio 4 (one token)
    assert flat(loss) == pytest.approx([-1.0, -1.0, 0.0, 1.0, 0.0, 0.0])
    assert metrics["sequence_ratio_mean"] == pytest.approx(2.5)


def test_gspo_gradient_with_seq_mean_token_mean_is_that_of_the_sequence_ratio():
    config = LossConfig(gspo_clip_low=10.0, gspo_clip_high=10.0)
    values = [[-0.3, -1.2, -0.7]]
    behaviour = [[-0.5, -1.0, -0.9]]
    lp = leaf(values)
    loss, _ = run("gspo", lp, behaviour, [0.7], [[1, 1, 1]], config)
    aggregate_loss(loss, torch.ones(1, 3), "seq_mean_token_mean", 3, 1).backward()
    reference = leaf(values)
    seq_ratio = torch.exp((reference - torch.tensor(behaviour, dtype=torch.float64)).mean())
    (-0.7 * seq_ratio).backward()
    assert flat(lp.grad) == pytest.approx(flat(reference.grad))


def test_gspo_clips_whole_sequences():
    lp = leaf([[0.01, 0.01], [0.0, 0.0]])
    loss, metrics = run("gspo", lp, [[0.0, 0.0], [0.0, 0.0]], [1.0, 1.0], [[1, 1], [1, 1]])
    assert metrics["clip_fraction"] == pytest.approx(0.5)
    assert loss.tolist()[0] == pytest.approx([-(1 + 4e-4)] * 2)


def test_mismatch_kl_is_the_k3_estimate_between_behaviour_and_trainer():
    lp = leaf([[math.log(0.5), 0.0]])
    _, metrics = run("pg", lp, [[0.0, 0.0]], [1.0], [[1, 0]])
    # ratio 0.5: 0.5 - log 0.5 - 1 ; the masked token does not count
    assert metrics["mismatch_kl"] == pytest.approx(0.5 - math.log(0.5) - 1)


def test_kl_coef_adds_the_k3_kl_to_the_reference_with_gradient():
    lp = leaf([[math.log(0.5)]])
    ref = [[math.log(0.25)]]
    config = LossConfig(kl_coef=0.1)
    loss, metrics = run("pg", lp, [[math.log(0.5)]], [0.0], [[1]], config, ref=ref)
    kl = 0.5 - math.log(0.5) - 1  # ref / pi = 0.5
    assert metrics["ref_kl"] == pytest.approx(kl)
    assert loss.item() == pytest.approx(0.1 * kl)
    loss.sum().backward()
    # d/dlogp [exp(ref - lp) - (ref - lp) - 1] = -exp(ref - lp) + 1 = 0.5
    assert lp.grad.item() == pytest.approx(0.1 * 0.5)


def test_kl_coef_without_reference_logprobs_is_a_clear_error():
    with pytest.raises(ValueError, match="ref_logprobs"):
        run("pg", leaf([[0.0]]), [[0.0]], [1.0], [[1]], LossConfig(kl_coef=0.1))


def test_every_loss_is_zero_on_masked_positions():
    lp = leaf([[-1.0, -2.0], [-0.3, -0.1]])
    for name in LOSSES:
        loss, _ = run(name, lp, [[-1.1, -1.9], [-0.2, -0.4]], [1.0, -2.0], [[1, 0], [0, 0]])
        assert loss[0, 1].item() == 0.0 and loss[1].abs().sum().item() == 0.0, name


@pytest.mark.parametrize("tis_cap", [None, 1.5])
def test_losses_declared_to_vanish_at_zero_advantage_do_so_with_zero_gradient(tis_cap):
    # The trainer skips such sequences' forward and backward; that is exact only if this holds.
    assert {"pg", "ppo_clip", "cispo", "gspo"} <= VANISH_AT_ZERO_ADVANTAGE
    behaviour = [[-1.1, -1.9, -0.5], [-0.3, -0.1, -3.0]]  # sequence 1 on-policy: inside every clip
    for name in VANISH_AT_ZERO_ADVANTAGE:
        lp = leaf([[-1.0, -2.0, -0.1], [-0.3, -0.1, -4.0]])
        loss, _ = run(name, lp, behaviour, [0.0, 1.5], [[1, 1, 1], [1, 1, 0]], LossConfig(tis_cap=tis_cap))
        aggregate_loss(loss, torch.tensor([[1.0, 1, 1], [1, 1, 0]]), "seq_mean_token_mean", 5, 2).backward()
        assert loss[0].abs().sum().item() == 0.0, name
        assert lp.grad[0].abs().sum().item() == 0.0, name
        assert lp.grad[1].abs().sum().item() > 0.0, name  # the other sequence still trains


def test_unknown_loss_error_lists_the_registered_names():
    with pytest.raises(ValueError) as info:
        run("dpo", leaf([[0.0]]), [[0.0]], [1.0], [[1]])
    for name in LOSSES:
        assert name in str(info.value)


def test_mismatched_shapes_are_a_clear_error():
    with pytest.raises(ValueError, match=r"advantages \(3,\) must be \[B\]"):
        run("pg", leaf([[0.0], [0.0]]), [[0.0], [0.0]], [1.0, 1.0, 1.0], [[1], [1]])


def test_aggregation_modes_match_hand_computed_values():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate_loss(loss, mask, "token_mean", 4, 2).item() == pytest.approx(10 / 4)
    assert aggregate_loss(loss, mask, "seq_mean_token_mean", 4, 2).item() == pytest.approx((2 + 4) / 2)
    assert aggregate_loss(loss, mask, "seq_mean_token_sum", 4, 2).item() == pytest.approx((6 + 4) / 2)


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"])
def test_micro_batch_losses_sum_to_the_whole_batch_loss(mode):
    generator = torch.Generator().manual_seed(0)
    loss = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    mask = (torch.rand(6, 5, generator=generator) > 0.3).to(torch.float64)
    mask[2] = 0  # a sequence without generated tokens still counts as a sequence
    tokens, sequences = int(mask.sum()), 6
    whole = aggregate_loss(loss, mask, mode, tokens, sequences)
    parts = sum(aggregate_loss(loss[i : i + 2], mask[i : i + 2], mode, tokens, sequences) for i in (0, 2, 4))
    assert parts.item() == pytest.approx(whole.item())


def test_unknown_aggregation_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="train.loss_aggregation"):
        aggregate_loss(torch.zeros(1, 1), torch.ones(1, 1), "sum", 1, 1)


def test_entropy_coef_subtracts_the_entropy_on_trained_tokens_with_gradient():
    lp = leaf([[-1.0, -2.0]])
    entropy = leaf([[0.7, 0.2]])
    config = LossConfig(entropy_coef=0.1)
    loss, metrics = compute_loss(
        "pg", lp, torch.tensor([[-1.0, -2.0]], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64),
        torch.tensor([[1.0, 0.0]], dtype=torch.float64), config, None, entropy,
    )  # fmt: skip
    # token 0: -0.5 * -1 - 0.1 * 0.7; token 1 is masked out
    assert flat(loss) == pytest.approx([0.5 - 0.07, 0.0])
    assert metrics["entropy"] == pytest.approx(0.7)
    assert metrics["policy_loss"] == pytest.approx(0.5)  # the policy term alone
    loss.sum().backward()
    assert flat(entropy.grad) == pytest.approx([-0.1, 0.0])


def test_entropy_coef_without_entropy_is_a_clear_error():
    with pytest.raises(ValueError, match="needs entropy"):
        run("pg", leaf([[0.0]]), [[0.0]], [1.0], [[1]], LossConfig(entropy_coef=0.01))
