"""An embedding whose weight is also used outside the module (GPT-style tying written
as ``h @ emb.weight.T``) is preconditioned from its lookups only: the optimizer says so
once, at the first factor update (``grad(weight)`` against the sum of the lookups'
contributions), and stays silent where the weight is used only by the module (untied
heads, a tie through a shared module parameter, micro-batches, ``padding_idx``,
``scale_grad_by_freq``, clipped or unscaled gradients, bf16 autocast, bags)."""

import math
import warnings

import pytest
import torch
from torch import nn

import torchsingd
from torchsingd.layers.embedding import EmbeddingAdapter

V, D = 40, 6


class TinyLM(nn.Module):
    def __init__(self, tie: str, padding_idx=None) -> None:
        super().__init__()
        self.tie = tie
        self.emb = nn.Embedding(V, D, padding_idx=padding_idx)
        self.mix = nn.Linear(D, D)
        if tie == "module":
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.emb.weight
        elif tie == "untied":
            self.head = nn.Linear(D, V, bias=False)

    def forward(self, x):
        h = torch.tanh(self.mix(self.emb(x)))
        return h @ self.emb.weight.T if self.tie == "functional" else self.head(h)


def _train(model, opt, batches, loss_scales=None):
    """Train on ``batches`` (steps of micro-batches); ``loss_scales``: per step, a
    factor on the loss. Returns the messages about uses outside the module."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, micro in enumerate(batches):
            opt.zero_grad()
            for x, y in micro:
                logits = model(x)
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y)
                (loss * (loss_scales[step] if loss_scales else 1.0)).backward()
            opt.step()
    return [str(w.message) for w in caught if "outside the module" in str(w.message)]


def _batches(steps, gen, low=0, high=12, micro=1):
    return [
        [
            (
                torch.randint(low, high, (3, 5), generator=gen),
                torch.randint(0, V, (15,), generator=gen),
            )
            for _ in range(micro)
        ]
        for _ in range(steps)
    ]


@pytest.mark.parametrize("cls", [torchsingd.SINGD, torchsingd.KFAC])
def test_functional_tie_warns_once_with_the_count_of_unlooked_rows(cls):
    torch.manual_seed(0)
    model = TinyLM("functional")
    opt = cls(model, T=2, warn_unsupported=False)
    gen = torch.Generator().manual_seed(1)
    batches = _batches(5, gen)
    # the first factor update is step 0: its rows outside the lookups all get the
    # projection's gradient (dense h, random weights)
    seen = batches[0][0][0].unique().numel()
    messages = _train(model, opt, batches)
    assert len(messages) == 1
    assert f"({V - seen} rows it did not look up have gradient)" in messages[0]
    assert "'emb'" in messages[0] and "h @ emb.weight.T" in messages[0]
    assert type(opt).__name__ in messages[0]


@pytest.mark.parametrize("tie", ["untied", "module"])
@pytest.mark.parametrize("cls", [torchsingd.SINGD, torchsingd.KFAC])
def test_weights_used_by_the_module_only_give_no_warning(cls, tie):
    torch.manual_seed(0)
    model = TinyLM(tie)
    opt = cls(model, T=1, warn_unsupported=False)
    assert _train(model, opt, _batches(3, torch.Generator().manual_seed(2))) == []


def test_micro_batches_count_the_sum_of_their_lookups():
    """Two micro-batches with disjoint tokens: each alone leaves rows of the
    accumulated gradient unexplained, together they explain all of it."""
    torch.manual_seed(0)
    model = TinyLM("untied")
    opt = torchsingd.SINGD(model, T=1, warn_unsupported=False)
    gen = torch.Generator().manual_seed(3)
    first = _batches(1, gen, 0, 20)[0] + _batches(1, gen, 20, 40)[0]
    assert _train(model, opt, [first]) == []


def test_padding_rows_and_a_penalty_on_the_weight():
    torch.manual_seed(0)
    model = TinyLM("untied", padding_idx=0)
    opt = torchsingd.SINGD(model, T=1, warn_unsupported=False)
    gen = torch.Generator().manual_seed(4)
    batches = _batches(2, gen)
    for micro in batches:  # padding tokens are looked up; their row stays zero
        micro[0][0][:, 0] = 0
    assert _train(model, opt, batches) == []
    # a penalty on the weight reaches every row: said as well (checked again after a
    # fresh optimizer, since the check runs once per layer)
    opt = torchsingd.SINGD(model, T=1, warn_unsupported=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, y = _batches(1, gen)[0][0]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).reshape(-1, V), y)
        (loss + 1e-3 * model.emb.weight.square().sum()).backward()
        opt.step()
    assert sum("outside the module" in str(w.message) for w in caught) == 1


def test_checked_once_then_no_cost(monkeypatch):
    calls = []
    original = EmbeddingAdapter.own_gradient

    def counting(self, module, x, grad_output, *, block=""):
        calls.append(x.shape)
        return original(self, module, x, grad_output, block=block)

    monkeypatch.setattr(EmbeddingAdapter, "own_gradient", counting)
    torch.manual_seed(0)
    model = TinyLM("untied")
    opt = torchsingd.SINGD(model, T=1, warn_unsupported=False)
    _train(model, opt, _batches(4, torch.Generator().manual_seed(5), micro=2))
    assert len(calls) == 2  # the two micro-batches of the first factor update
    (state,) = opt._entries["emb"].blocks.values()
    assert state.own is None and state.own_checked


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag(mode, tie):
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(V, D, mode=mode)
    head = nn.Linear(D, 3)
    model = nn.ModuleDict({"bag": bag, "head": head})
    opt = torchsingd.SINGD(model, T=1, warn_unsupported=False)
    gen = torch.Generator().manual_seed(6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            tokens = torch.randint(0, 15, (9,), generator=gen)
            offsets = torch.tensor([0, 4])
            weights = torch.rand(9, generator=gen) if mode == "sum" else None
            opt.zero_grad()
            h = bag(tokens, offsets, per_sample_weights=weights)
            out = head(h)
            if tie:  # the bag's weight scores the vocabulary as well
                out = torch.cat([out, h @ bag.weight.T], 1)
            out.square().mean().backward()
            opt.step()
    messages = [str(w.message) for w in caught if "outside the module" in str(w.message)]
    assert len(messages) == (1 if tie else 0)


def test_a_tie_is_seen_when_every_token_was_looked_up():
    """A small vocabulary (character-level) is looked up entirely in one step: the
    projection's gradient still shows as the part not explained by the lookups."""
    torch.manual_seed(0)
    model = TinyLM("functional")
    opt = torchsingd.SINGD(model, T=1, warn_unsupported=False)
    x = torch.arange(V).reshape(4, V // 4)
    y = torch.randint(0, V, (V,), generator=torch.Generator().manual_seed(7))
    messages = _train(model, opt, [[(x, y)]])
    assert len(messages) == 1 and "(0 rows it did not look up have gradient)" in messages[0]


def _own_matches(model, x, y):
    """The adapter's own gradient equals PyTorch's grad(weight) of an untied model."""
    model.zero_grad()
    out = model.emb(x)
    out.retain_grad()
    logits = model.head(torch.tanh(model.mix(out)))
    nn.functional.cross_entropy(logits.reshape(-1, V), y).backward()
    own = EmbeddingAdapter().own_gradient(model.emb, x, out.grad)
    torch.testing.assert_close(own, model.emb.weight.grad.T, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("options", [{}, {"padding_idx": 3}, {"scale_grad_by_freq": True}])
def test_own_gradient_is_the_lookups_gradient(options):
    torch.manual_seed(0)
    model = TinyLM("untied").double()
    model.emb = nn.Embedding(V, D, **options).double()
    gen = torch.Generator().manual_seed(8)
    x = torch.randint(0, 8, (3, 7), generator=gen)
    x[0, :3] = 3  # repeated tokens (and the padding index where there is one)
    _own_matches(model, x, torch.randint(0, V, (21,), generator=gen))


@pytest.mark.parametrize("setting", ["clip", "unscaled", "bf16-autocast", "bf16-weights"])
def test_rescaled_or_rounded_gradients_give_no_warning(setting):
    """Clipping and unscaling scale grad(weight) as a whole (the check is up to a
    factor); bf16 rounds it (a looser tolerance for 16-bit weights)."""
    torch.manual_seed(0)
    model = TinyLM("untied")
    if setting == "bf16-weights":
        model = model.bfloat16()
    opt = torchsingd.SINGD(model, T=1, warn_unsupported=False)
    gen = torch.Generator().manual_seed(9)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            x, y = (
                torch.randint(0, 30, (6, 9), generator=gen),
                torch.randint(0, V, (54,), generator=gen),
            )
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=setting == "bf16-autocast"):
                loss = nn.functional.cross_entropy(model(x).reshape(-1, V).float(), y)
            (loss * (1024.0 if setting == "unscaled" else 1.0)).backward()
            if setting == "unscaled":  # as GradScaler.unscale_ does, after the capture
                for p in model.parameters():
                    p.grad.div_(1024.0)
            if setting == "clip":
                nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            opt.step()
    assert not [w for w in caught if "outside the module" in str(w.message)]


@pytest.mark.parametrize("cls", [torchsingd.SINGD, torchsingd.KFAC])
def test_a_skipped_first_update_leaves_the_check_to_the_next(cls):
    """A non-finite gradient at the first factor update skips the step: the check
    waits for the next factor update instead of being spent on it."""
    torch.manual_seed(0)
    model = TinyLM("functional")
    opt = cls(model, T=1, warn_unsupported=False)
    batches = _batches(3, torch.Generator().manual_seed(10))
    messages = _train(model, opt, batches, loss_scales=[math.nan, 1.0, 1.0])
    assert opt.skipped_steps == 1
    assert len(messages) == 1


def test_bf16_weights_with_many_lookups_per_row_give_no_warning():
    """PyTorch sums a bf16 weight's gradient in bf16 (a few percent off with hundreds
    of lookups per row): not reported as a use outside the module."""
    torch.manual_seed(0)
    model = TinyLM("untied").bfloat16()
    opt = torchsingd.SINGD(model, T=1, warn_unsupported=False)
    gen = torch.Generator().manual_seed(11)
    x = torch.randint(0, V, (64, 256), generator=gen)
    y = torch.randint(0, V, (64 * 256,), generator=gen)
    assert _train(model, opt, [[(x, y)]]) == []
    # a functional tie in bf16 is still seen (its projection's share is large)
    torch.manual_seed(0)
    model = TinyLM("functional").bfloat16()
    opt = torchsingd.SINGD(model, T=1, warn_unsupported=False)
    assert len(_train(model, opt, [[(x, y)]])) == 1
