"""Language-model losses: next-token cross-entropy on tensors, tuples and dicts, padding, labels, HF and
TransformerLens outputs, vmap over stacked parameters, and bad batches."""
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

import slt_tools as slt
from slt_tools.models import Transformer, TransformerConfig

pytestmark = pytest.mark.filterwarnings("ignore:HookedTransformer is deprecated:DeprecationWarning")

L = slt.losses


def model_and_tokens(seed=0):
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, d_vocab=11, n_ctx=8,
                                          init_std=0.3))
    return model, torch.randint(0, 11, (4, 8), generator=torch.Generator().manual_seed(seed))


def reference(logits, tokens, valid):
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1), reduction="none")
    return (ce * valid.reshape(-1)).sum() / valid.sum()


def test_tensor_tuple_and_dict_batches_agree_with_the_reference():
    model, toks = model_and_tokens()
    want = F.cross_entropy(model(toks)[:, :-1].reshape(-1, 11), toks[:, 1:].reshape(-1))
    for batch in (toks, (toks,), [toks], {"input_ids": toks}, {"input_ids": toks.tolist()}):
        torch.testing.assert_close(L.causal_lm(model, batch), want)
    losses, valid = L.per_token_loss(model, toks)
    assert losses.shape == valid.shape == (4, 7) and valid.all()


def test_padding_is_masked_and_pad_tokens_do_not_matter():
    model, toks = model_and_tokens(1)
    mask = torch.ones_like(toks)
    mask[0, 5:], mask[2, 3:] = 0, 0  # right padding
    valid = (mask[:, 1:] * mask[:, :-1]).float()
    want = reference(model(toks), toks, valid)
    other = toks.clone()
    other[mask == 0] = 7  # what the padding holds is irrelevant
    for t in (toks, other):
        torch.testing.assert_close(L.causal_lm(model, {"input_ids": t, "attention_mask": mask}), want)
        torch.testing.assert_close(L.causal_lm(model, (t, mask)), want)
    labels = toks.clone()
    labels[:, :4] = -100  # HF convention: ignored targets
    torch.testing.assert_close(L.causal_lm(model, {"input_ids": toks, "labels": labels}),
                               reference(model(toks), toks, (labels[:, 1:] != -100).float()))


def test_vmapped_over_stacked_parameters_matches_each_chain():
    model, toks = model_and_tokens(2)
    batch = {"input_ids": toks, "attention_mask": (torch.arange(8) < 6).long().expand(4, 8)}
    params = {k: v.detach() for k, v in model.named_parameters()}
    stacked = {k: v + 0.1 * torch.randn((3, *v.shape)) for k, v in params.items()}
    out = vmap(lambda p: L.causal_lm(lambda x: functional_call(model, p, (x,)), batch))(stacked)
    for c in range(3):
        one = {k: v[c] for k, v in stacked.items()}
        torch.testing.assert_close(out[c], L.causal_lm(lambda x, p=one: functional_call(model, p, (x,)), batch))


def test_hugging_face_output_and_mask_match_its_own_loss():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0,
                                  eos_token_id=0, initializer_range=0.3)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    _, toks = model_and_tokens(3)
    mask = torch.ones_like(toks)
    mask[1, 6:] = 0
    labels = toks.masked_fill(mask == 0, -100)
    with torch.no_grad():
        hf = model(input_ids=toks, attention_mask=mask, labels=labels).loss
        ours = L.causal_lm(model, {"input_ids": toks, "attention_mask": mask})
        assert abs(hf - ours) < 1e-5
        assert abs(model(input_ids=toks, labels=toks).loss - L.causal_lm(model, toks)) < 1e-5


def test_transformer_lens_logits_match_its_own_loss():
    tl = pytest.importorskip("transformer_lens")
    cfg = tl.HookedTransformerConfig(n_layers=1, d_model=16, n_ctx=8, d_head=8, n_heads=2, d_vocab=11,
                                     act_fn="relu", device="cpu", seed=0, initializer_range=0.3)
    model = tl.HookedTransformer(cfg).eval()
    _, toks = model_and_tokens(4)
    with torch.no_grad():
        torch.testing.assert_close(L.causal_lm(model, toks), model(toks, return_type="loss"))


def test_bad_batches_are_clear_value_errors():
    model, toks = model_and_tokens()
    with pytest.raises(ValueError, match=r"input_ids is ragged \(sequence lengths \[3, 5\]\).*attention_mask"):
        L.causal_lm(model, {"input_ids": [[1, 2, 3], [1, 2, 3, 4, 5]]})
    with pytest.raises(ValueError, match="attention_mask has shape"):
        L.causal_lm(model, {"input_ids": toks, "attention_mask": toks[:, :5]})
    with pytest.raises(ValueError, match="attention_mask is ragged"):
        L.token_batch({"input_ids": [[1, 2], [3, 4]], "attention_mask": [[1, 1], [1]]})
    with pytest.raises(ValueError, match="needs 'input_ids'"):
        L.causal_lm(model, {"tokens": toks})
    with pytest.raises(ValueError, match="integer token ids"):
        L.causal_lm(model, toks.float())
    with pytest.raises(ValueError, match="at least 2 tokens"):
        L.causal_lm(model, toks[:, :1])
    with pytest.raises(ValueError, match=r"\(input_ids,\) or \(input_ids, attention_mask\)"):
        L.causal_lm(model, (toks, toks, toks))


def test_per_token_loss_equals_the_sliced_formula_and_copies_the_logits_once():
    """Bit-for-bit the cross-entropy of the sliced logits (with padding and ignored labels), and only one tensor as
    large as the logits is made (log_softmax's output): no copy of the logits before it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(4)
    logits = torch.randn(3, 9, 17)
    ids = torch.randint(0, 17, (3, 9), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(torch.rand(3, 9, generator=torch.Generator().manual_seed(5)) < 0.2, -100)

    def model(x):
        return logits

    for batch in (ids, {"input_ids": ids, "attention_mask": mask, "labels": labels}):
        losses, valid = L.per_token_loss(model, batch)
        targets = (labels if isinstance(batch, dict) else ids)[:, 1:]
        old = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.clamp_min(0).flatten(), reduction="none")
        torch.testing.assert_close(losses, old.view_as(targets) * valid, rtol=0, atol=0)

    class Sizes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.big = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor) and t.numel() >= logits[:, :-1].numel() and t._base is None \
                        and t.untyped_storage().data_ptr() != logits.untyped_storage().data_ptr():
                    self.big.append(str(func))
            return out

    with Sizes() as sizes:
        L.per_token_loss(model, ids)
    assert len(sizes.big) == 1 and "log_softmax" in sizes.big[0], sizes.big
