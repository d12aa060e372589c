"""``eval/reverse_kl`` is KL(π ‖ p̃_E) with p̃_E = (1 − ε)·p_E^tok + ε·(random typist), checked on
token-sequence spaces small enough to enumerate: every sequence the sampler can emit with a
vocabulary of V tokens and a cap of N new tokens (EOS ends a response; so does the cap).

Sampling tolerances are 5 standard errors computed exactly from the distributions; generators
are seeded.
"""

import itertools
import math
import random
import statistics

import pytest
import torch

from lightning_irl.data.tasks import KnownExpertTask, normalize
from lightning_irl.metrics import ReverseKL, SampleEvaluator
from lightning_irl.metrics.functional import (
    estimate,
    exact_kls,
    reverse_kl_terms,
    rollout_expert_logps,
    smoothed_expert_logp,
    typist_logp,
)
from lightning_irl.rollout import Rollout

EOS = 0


def emittable(vocab, cap):
    """Every response a sampler with tokens 0..vocab-1 (EOS = 0) and ``cap`` new tokens can emit."""
    words = range(1, vocab)
    out = []
    for length in range(1, cap + 1):
        out += [body + (EOS,) for body in itertools.product(words, repeat=length - 1)]
    out += list(itertools.product(words, repeat=cap))  # cut off by the cap, no EOS
    return out


def autoregressive(vocab, cap, generator, temperature=1.0):
    """π over ``emittable(vocab, cap)`` from random next-token logits at every prefix."""
    policy = {}

    def walk(prefix, logp):
        if (prefix and prefix[-1] == EOS) or len(prefix) == cap:
            policy[prefix] = math.exp(logp)
            return
        logits = torch.randn(vocab, generator=generator, dtype=torch.float64) * temperature
        for token, lp in enumerate(torch.log_softmax(logits, -1).tolist()):
            walk(prefix + (token,), logp + lp)

    walk((), 0.0)
    return policy


def categorical(space, rng, concentration):
    """π with Dirichlet(concentration) weights over ``space`` (small concentration: spiky)."""
    weights = [max(rng.gammavariate(concentration, 1.0), 1e-300) for _ in space]
    total = sum(weights)
    return {y: w / total for y, w in zip(space, weights)}


def typist(y, vocab):
    return vocab ** -len(y)


# p_E^tok: the expert's answers in their canonical spellings (EOS-terminated), V = 3, N = 3
V, CAP = 3, 3
EXPERT = {(1, 2, EOS): 0.5, (2, EOS): 0.3, (1, 1, EOS): 0.2}


@pytest.mark.parametrize("vocab,cap", [(2, 1), (2, 5), (3, 3), (4, 4), (7, 2)])
def test_the_typist_is_a_distribution_over_what_the_sampler_can_emit(vocab, cap):
    space = emittable(vocab, cap)
    assert len(space) == len(set(space)) == sum((vocab - 1) ** (n - 1) for n in range(1, cap + 1)) + (vocab - 1) ** cap
    lengths = torch.tensor([len(y) for y in space])
    total = typist_logp(lengths, vocab).double().exp().sum()
    assert float(total) == pytest.approx(1.0, abs=1e-6)
    # ε = 1: the smoothed expert is the typist itself, whatever the expert says
    expert = torch.full((len(space),), -1.0)
    total = smoothed_expert_logp(expert, lengths, vocab, eps=1.0).double().exp().sum()
    assert float(total) == pytest.approx(1.0, abs=1e-6)


def test_smoothed_expert_by_hand():
    eps, vocab = 0.01, 5
    out = smoothed_expert_logp(torch.tensor([math.log(0.25), -math.inf, float("nan")]),
                               torch.tensor([3, 2, 4]), vocab, eps)
    assert out.tolist() == pytest.approx([math.log(0.99 * 0.25 + 0.01 * 5 ** -3), math.log(0.01 * 5 ** -2),
                                          math.log(0.01 * 5 ** -4)], rel=1e-6)
    assert reverse_kl_terms(torch.tensor([-1.0]), out[1:2]).item() == pytest.approx(-1.0 - math.log(0.01 * 5 ** -2))
    with pytest.raises(ValueError):
        smoothed_expert_logp(torch.tensor([0.0]), torch.tensor([1]), vocab, eps=0.0)


def tensor_reverse_kl(expert, policy, vocab, eps):
    """Σ_y π(y)[log π(y) − log p̃_E(y)] through the tensor functions the metric uses."""
    ys = [y for y, q in policy.items() if q > 0]
    q = torch.tensor([policy[y] for y in ys], dtype=torch.float64)
    p = torch.tensor([math.log(expert[y]) if y in expert else -math.inf for y in ys])
    smoothed = smoothed_expert_logp(p, torch.tensor([len(y) for y in ys]), vocab, eps).double()
    return float((q * (q.log() - smoothed)).sum())


def test_exact_reverse_kl_is_nonnegative_for_many_policies():
    space = emittable(V, CAP)
    generator = torch.Generator().manual_seed(0)
    policies = [autoregressive(V, CAP, generator, temperature=t) for t in (0.3, 1.0, 3.0, 10.0) for _ in range(25)]
    rng = random.Random(0)
    policies += [categorical(space, rng, c) for c in (0.01, 0.1, 1.0) for _ in range(25)]
    policies += [{y: 1.0} for y in space]  # every point mass, valid or not
    smallest = math.inf
    for i, policy in enumerate(policies):
        assert sum(policy.values()) == pytest.approx(1.0)
        for eps in (1e-3, 0.1, 0.9):
            kl = exact_kls(EXPERT, policy, V, eps)["reverse_kl"]
            assert kl >= -1e-12, (i, eps, kl)
            smallest = min(smallest, kl)
            assert tensor_reverse_kl(EXPERT, policy, V, eps) == pytest.approx(kl, rel=1e-5, abs=1e-5)
    assert smallest < 0.1  # the check is not vacuous: some policies come close to p̃_E


def test_the_expert_unreachable_answers_keep_it_a_divergence():
    # an answer longer than the cap can never be emitted: p̃_E sums to less than 1 over the space
    expert = {(1, 2, EOS): 0.4, (2, EOS): 0.3, (1, 1, 2, EOS): 0.3}
    space = emittable(V, CAP)
    eps = 1e-3
    mass = sum((1 - eps) * expert.get(y, 0.0) + eps * typist(y, V) for y in space)
    assert mass == pytest.approx(1 - 0.3 * (1 - eps))
    generator = torch.Generator().manual_seed(1)
    for _ in range(50):
        policy = autoregressive(V, CAP, generator, temperature=2.0)
        assert exact_kls(expert, policy, V, eps)["reverse_kl"] >= -math.log(mass) - 1e-12  # Gibbs


def mixture(alpha, expert, space, vocab):
    return {y: alpha * expert.get(y, 0.0) + (1 - alpha) * typist(y, vocab) for y in space}


def mixture_kl(alpha, expert, vocab, eps):
    """KL(α·p_E + (1 − α)·u ‖ (1 − ε)·p_E + ε·u) in closed form: off the expert's answers both are
    multiples of u (ratio (1 − α)/ε), so only the answers need a term of their own."""
    u_support = sum(typist(y, vocab) for y in expert)
    kl = (1 - alpha) * (1 - u_support) * (math.log((1 - alpha) / eps) if alpha < 1 else 0.0)
    for y, p in expert.items():
        q = alpha * p + (1 - alpha) * typist(y, vocab)
        kl += q * math.log(q / ((1 - eps) * p + eps * typist(y, vocab)))
    return kl


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
@pytest.mark.parametrize("eps", [1e-3, 0.2])
def test_exact_sum_matches_the_closed_form(alpha, eps):
    space = emittable(V, CAP)
    policy = mixture(alpha, EXPERT, space, V)
    exact = exact_kls(EXPERT, policy, V, eps)
    assert exact["reverse_kl"] == pytest.approx(mixture_kl(alpha, EXPERT, V, eps), rel=1e-9, abs=1e-12)
    assert exact["invalid_mass"] == pytest.approx((1 - alpha) * (1 - sum(typist(y, V) for y in EXPERT)))
    if alpha == 1.0:  # the expert itself: only the ε shift remains, at most −log(1 − ε)
        assert 0 < exact["reverse_kl"] <= -math.log(1 - eps)
        assert exact["reverse_kl_valid"] == pytest.approx(0.0, abs=1e-12)


def test_kl_to_the_smoothed_expert_itself_is_zero():
    space = emittable(V, CAP)
    eps = 0.2
    policy = {y: (1 - eps) * EXPERT.get(y, 0.0) + eps * typist(y, V) for y in space}
    assert exact_kls(EXPERT, policy, V, eps)["reverse_kl"] == pytest.approx(0.0, abs=1e-12)


def test_estimator_is_unbiased_and_reports_the_right_standard_error():
    space = emittable(V, CAP)
    policy = autoregressive(V, CAP, torch.Generator().manual_seed(2), temperature=1.5)
    eps, n = 1e-3, 20_000
    exact = exact_kls(EXPERT, policy, V, eps)["reverse_kl"]

    def term(y):
        return math.log(policy[y]) - math.log((1 - eps) * EXPERT.get(y, 0.0) + eps * typist(y, V))

    mean = sum(q * term(y) for y, q in policy.items())
    assert mean == pytest.approx(exact, rel=1e-9)
    se = math.sqrt(sum(q * (term(y) - mean) ** 2 for y, q in policy.items()) / n)

    probs = torch.tensor([policy[y] for y in space], dtype=torch.float64)
    draws = torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(3)).tolist()
    ys = [space[i] for i in draws]
    policy_logp = torch.tensor([math.log(policy[y]) for y in ys])
    expert_logp = torch.tensor([math.log(EXPERT[y]) if y in EXPERT else -math.inf for y in ys])
    smoothed = smoothed_expert_logp(expert_logp, torch.tensor([len(y) for y in ys]), V, eps)
    metric = ReverseKL()
    for start in range(0, n, 3000):  # several updates accumulate like one
        metric.update(policy_logp[start : start + 3000], smoothed[start : start + 3000])
    out = metric.compute()
    assert abs(float(out["reverse_kl"]) - exact) < 5 * se
    assert float(out["reverse_kl_se"]) == pytest.approx(se, rel=0.05)
    # the plain helper gives the same numbers from the terms themselves
    m, s = estimate(reverse_kl_terms(policy_logp, smoothed))
    assert m == pytest.approx(float(out["reverse_kl"]), rel=1e-5)
    assert s == pytest.approx(float(out["reverse_kl_se"]), rel=1e-4)


def test_standard_error_is_undefined_below_two_samples():
    metric = ReverseKL()
    assert math.isnan(float(metric.compute()["reverse_kl"]))
    metric.update(torch.tensor([-1.0]), torch.tensor([-3.0]))
    out = metric.compute()
    assert float(out["reverse_kl"]) == 2.0 and math.isnan(float(out["reverse_kl_se"]))


def floored_terms(policy_logp, expert_logp):
    """The estimator this metric replaced: log π − max(log p_E, log 1e-6)."""
    return policy_logp - expert_logp.clamp(min=math.log(1e-6))


def test_spread_out_junk_now_scores_worse_than_a_concentrated_valid_policy():
    # a grammar-sized vocabulary: too many sequences to enumerate, the mixture's closed form instead
    vocab, cap, eps, n = 320, 8, 1e-3, 4000
    expert = {(5, 6, 7, EOS): 0.6, (7, 6, 5, EOS): 0.3, (5, 7, 6, EOS): 0.1}
    generator = torch.Generator().manual_seed(4)
    answers = list(expert)
    ys = []
    for _ in range(n):  # half the expert, half a random typist
        if torch.rand((), generator=generator) < 0.5:
            ys.append(answers[int(torch.multinomial(torch.tensor(list(expert.values())), 1, generator=generator))])
        else:
            y = []
            while len(y) < cap and (not y or y[-1] != EOS):
                y.append(int(torch.randint(vocab, (), generator=generator)))
            ys.append(tuple(y))
    lengths = torch.tensor([len(y) for y in ys])
    policy_logp = torch.tensor([math.log(0.5 * expert.get(y, 0.0) + 0.5 * typist(y, vocab)) for y in ys],
                               dtype=torch.float64).float()
    expert_logp = torch.tensor([math.log(expert[y]) if y in expert else -math.inf for y in ys])
    spread, spread_se = estimate(reverse_kl_terms(policy_logp, smoothed_expert_logp(expert_logp, lengths, vocab, eps)))
    assert abs(spread - mixture_kl(0.5, expert, vocab, eps)) < 5 * spread_se
    # all mass on the expert's favourite answer: valid, but far from the expert's spread
    top = answers[0]
    concentrated = exact_kls(expert, {top: 1.0}, vocab, eps)["reverse_kl"]
    assert concentrated == pytest.approx(-math.log(0.6), abs=2e-3)
    assert spread > concentrated + 1.0
    # the floored estimate ranked them the other way round, the spread policy below zero
    old_spread = float(floored_terms(policy_logp, expert_logp).mean())
    old_concentrated = -math.log(0.6)
    assert old_spread < 0 < old_concentrated


# ---- from a Rollout: canonical spellings with a sub-word tokenizer ----------------------------
class TwoAnswers(KnownExpertTask):
    """One prompt, two answers; "abab ab" has many spellings under a small BPE vocabulary."""

    name = "two_answers"
    SUPPORT = {"abab ab": 0.7, "ab": 0.3}
    MODES = {"abab ab": "long", "ab": "short"}

    def sample_prompt(self, rng):
        return "go ="

    def support(self, prompt):
        return dict(self.SUPPORT)

    def mode_of(self, prompt, response):
        return self.MODES.get(normalize(response))

    def mode_weights(self, prompt):
        return {"long": 0.7, "short": 0.3}

    def vocabulary(self):
        return ["go", "=", "abab", "ab"]


def bpe_tokenizer(lines):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=40, special_tokens=["<pad>", "<eos>", "<unk>"], min_frequency=1,
                                  show_progress=False)
    backend.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", clean_up_tokenization_spaces=False)


def hand_rollout(tokenizer, prompt, responses, width):
    """A Rollout as ``rollout.sample`` lays it out (one prompt, no left padding), log π made up."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    n, p = len(responses), len(prompt_ids)
    input_ids = torch.full((n, p + width), pad)
    attention = torch.zeros(n, p + width, dtype=torch.long)
    loss_mask = torch.zeros(n, p + width, dtype=torch.long)
    input_ids[:, :p] = torch.tensor(prompt_ids)
    attention[:, :p] = 1
    for i, ids in enumerate(responses):
        input_ids[i, p : p + len(ids)] = torch.tensor(ids)
        attention[i, p : p + len(ids)] = 1
        loss_mask[i, p : p + len(ids)] = 1
    logprobs = -torch.rand(n, p + width - 1, generator=torch.Generator().manual_seed(5)) * 3
    finished = torch.tensor([ids[-1] == eos for ids in responses])
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Rollout(input_ids, attention, loss_mask, logprobs, finished, p, texts)


def test_update_rollout_scores_only_the_canonical_spelling():
    task = TwoAnswers()
    tokenizer = bpe_tokenizer(["go =", "abab ab", "ab", "ab abab"] * 3)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    canonical_long, canonical_short = encode("abab ab") + [eos], encode("ab") + [eos]
    by_letter = tokenizer.convert_tokens_to_ids(["▁", "a", "b", "a", "b", "▁", "a", "b"]) + [eos]
    assert tokenizer.decode(by_letter, skip_special_tokens=True) == "abab ab" and by_letter != canonical_long
    width = len(by_letter)
    rows = {
        "canonical long": (canonical_long, "valid", True),
        "spelled by letter": (by_letter, "valid", False),
        "canonical short": (canonical_short, "valid", True),
        "pad inside": (encode("ab") + [pad, eos], "invalid", False),
        "cut at the cap": (encode("ab ab ab ab ab ab ab ab ab")[:width], "invalid", False),
        "not an answer": (encode("ba") + [eos], "invalid", False),
    }
    responses = [ids for ids, _, _ in rows.values()]
    assert tokenizer.decode(responses[3], skip_special_tokens=True) == "ab"  # looks valid once decoded
    assert len(responses[4]) == width and eos not in responses[4]
    rollout = hand_rollout(tokenizer, "go =", responses, width)
    vocab = len(tokenizer) + 24  # an output layer wider than the tokenizer
    eps = 0.01

    # by hand: p_E of the string, p_E^tok of the canonical spelling only, L with EOS
    policy = rollout.sequence_logprobs.tolist()
    string, token, terms = [], [], []
    for (ids, verdict, canonical), text, lp in zip(rows.values(), rollout.responses, policy):
        p = task.SUPPORT[text] if verdict == "valid" else 0.0
        string.append(math.log(p) if p else -math.inf)
        token.append(math.log(p) if canonical else -math.inf)
        terms.append(lp - math.log((1 - eps) * (p if canonical else 0.0) + eps * vocab ** -len(ids)))
    got = rollout_expert_logps(task, tokenizer, ["go ="], rollout, num_samples=len(rows))
    assert got[0].tolist() == pytest.approx(string)
    assert got[1].tolist() == pytest.approx(token)
    assert got[2].tolist() == [len(ids) for ids in responses]

    evaluator = SampleEvaluator(task, smoothing=eps)
    evaluator.update_rollout(["go ="], rollout, tokenizer, len(rows), vocab_size=vocab)
    out = {k: float(v) for k, v in evaluator.compute().items()}
    assert out["reverse_kl"] == pytest.approx(statistics.fmean(terms), rel=1e-5)
    assert out["reverse_kl_se"] == pytest.approx(statistics.stdev(terms) / math.sqrt(len(terms)), rel=1e-4)
    assert out["invalid_mass"] == pytest.approx(0.5)
    valid = [lp - s for lp, s in zip(policy, string) if math.isfinite(s)]
    assert out["reverse_kl_valid"] == pytest.approx(statistics.fmean(valid) - math.log(0.5), rel=1e-5)
    assert out["mass_long"] == pytest.approx(2 / 6) and out["mass_short"] == pytest.approx(1 / 6)


def test_support_batches_feed_the_exact_forward_kl():
    task = TwoAnswers()
    tokenizer = bpe_tokenizer(["go =", "abab ab", "ab", "ab abab"] * 3)
    evaluator = SampleEvaluator(task, support_batch_size=3)
    batches = evaluator.support_batches(["go =", "go =", "go ="], tokenizer)
    assert [b["input_ids"].size(0) for b in batches] == [2]  # one prompt, scored once, weighted 3×
    batch = batches[0]
    prompt_ids = tokenizer("go =")["input_ids"]
    for i, answer in enumerate(batch["response"]):
        ids = prompt_ids + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert batch["input_ids"][i, : len(ids)].tolist() == ids
        assert batch["loss_mask"][i].tolist()[: len(ids)] == [0] * len(prompt_ids) + [1] * (len(ids) - len(prompt_ids))
    assert batch["weight"].tolist() == pytest.approx([3 * task.SUPPORT[a] for a in batch["response"]])
    # made-up per-token log-probs of the policy: the metric is Σ_y p_E(y)(log p_E(y) − log π(y))
    token_logps = -torch.rand(batch["input_ids"].shape[0], batch["input_ids"].shape[1] - 1,
                              generator=torch.Generator().manual_seed(6))
    evaluator.update_support(batch, token_logps)
    expected = 0.0
    for i, answer in enumerate(batch["response"]):
        log_pi = float((token_logps[i] * batch["loss_mask"][i, 1:]).sum())
        expected += task.SUPPORT[answer] * (math.log(task.SUPPORT[answer]) - log_pi)
    assert float(evaluator.forward_kl.compute()) == pytest.approx(expected, rel=1e-6)


def test_exact_log_ratios_of_rollouts_and_demonstrations():
    """h* = log p_E^tok − log π, what an optimal discriminator would output (for the adversarial
    module's fidelity metrics)."""
    from lightning_irl.data.collate import DemonstrationCollator
    from lightning_irl.data.encode import encode_records

    task = TwoAnswers()
    tokenizer = bpe_tokenizer(["go =", "abab ab", "ab", "ab abab"] * 3)
    eos = tokenizer.eos_token_id
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    by_letter = tokenizer.convert_tokens_to_ids(["▁", "a", "b", "a", "b", "▁", "a", "b"]) + [eos]
    responses = [encode("abab ab") + [eos], by_letter, encode("ab") + [eos], encode("ba") + [eos]]
    rollout = hand_rollout(tokenizer, "go =", responses, len(by_letter))
    evaluator = SampleEvaluator(task)
    ratios = evaluator.rollout_log_ratios(["go ="], rollout, tokenizer)
    policy = rollout.sequence_logprobs
    assert ratios[0].item() == pytest.approx(math.log(0.7) - policy[0].item(), rel=1e-6)
    assert ratios[2].item() == pytest.approx(math.log(0.3) - policy[2].item(), rel=1e-6)
    assert ratios[1].item() == -math.inf and ratios[3].item() == -math.inf  # the expert never spells it so

    records = [{"prompt": "go =", "response": "abab ab"}, {"prompt": "go =", "response": "ab"}]
    examples, _ = encode_records(records, tokenizer)
    short, _ = encode_records([{"prompt": "go =", "response": "abab ab"}], tokenizer, max_length=3)  # cut: no EOS
    batch = DemonstrationCollator(tokenizer.pad_token_id)(examples + short)
    token_logps = -torch.rand(3, batch["input_ids"].size(1) - 1, generator=torch.Generator().manual_seed(7))
    got = evaluator.demonstration_log_ratios(batch, token_logps, eos)
    for i, p in enumerate((0.7, 0.3)):
        log_pi = float((token_logps[i] * batch["loss_mask"][i, 1:]).sum())
        assert got[i].item() == pytest.approx(math.log(p) - log_pi, rel=1e-6)
    assert math.isnan(got[2].item())
