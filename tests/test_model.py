import pytest
import torch
from torch import nn
from torch.nn import functional as F

import reference_caption
from conftest import make_opt, shared_file
from data import caption_branch_target, collate_fn
from model import VSRN, ContrastiveLoss, caption_steps, order_sim
from GCN_lib.Rs_GCN import Rs_GCN
from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError, OptionError


def test_legacy_checkpoint_reproduces_reference_embeddings():
    checkpoint = load_checkpoint(shared_file("fixtures", "legacy_vsrn_f30k_tiny.pth.tar"))
    io = torch.load(shared_file("fixtures", "legacy_vsrn_f30k_tiny_io.pt"))
    opt = checkpoint["opt"]
    opt.device = "cpu"
    model = VSRN(opt)
    model.load_state_dict(checkpoint["model"])
    model.val_start()
    with torch.no_grad():
        img_emb, cap_emb, regions = model.forward_emb(io["images"], io["captions"], io["lengths"].tolist())
    torch.testing.assert_close(img_emb, io["img_emb"], atol=1e-5, rtol=0)
    torch.testing.assert_close(cap_emb, io["cap_emb"], atol=1e-5, rtol=0)
    torch.testing.assert_close(regions, io["gcn_img_emb"], atol=1e-5, rtol=0)


def reference_image_encoder(enc, images):
    """The original forward written out with Conv1d calls on (B, C, N), for a non-f30k data_name."""
    x = enc.fc(images)
    x = x / x.pow(2).sum(1, keepdim=True).sqrt()  # across regions
    v = x.permute(0, 2, 1)
    for gcn in (enc.Rs_GCN_1, enc.Rs_GCN_2, enc.Rs_GCN_3, enc.Rs_GCN_4):
        g = gcn.g(v).permute(0, 2, 1)
        theta = gcn.theta(v).permute(0, 2, 1)
        phi = gcn.phi(v)
        R = torch.matmul(theta, phi)
        y = torch.matmul(R / R.size(-1), g).permute(0, 2, 1)
        v = gcn.W(y) + v
    regions = v.permute(0, 2, 1)
    regions = regions / regions.pow(2).sum(1, keepdim=True).sqrt()
    _, hidden = enc.img_rnn(regions)
    out = hidden[0]
    return out / out.pow(2).sum(1, keepdim=True).sqrt(), regions


def randomize(module, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        for b in module.buffers():
            if b.dtype.is_floating_point:
                b.copy_(torch.rand(b.shape, generator=generator) + 0.5)


def test_coco_path_normalises_across_regions_and_has_no_final_batchnorm():
    torch.manual_seed(0)
    model = VSRN(make_opt(data_name="coco_precomp"))
    enc = model.img_enc
    randomize(enc)
    assert not hasattr(enc, "bn") and not any(k.startswith("bn.") for k in enc.state_dict())
    model.val_start()
    images = torch.rand(3, 36, 32)
    with torch.no_grad():
        emb, regions = enc(images)
        ref_emb, ref_regions = reference_image_encoder(enc, images)
    torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(regions, ref_regions, atol=1e-5, rtol=1e-5)
    # The quirk: unit norm over the 36 regions for every feature, not over features.
    torch.testing.assert_close(regions.pow(2).sum(1), torch.ones(3, 32))


def test_f30k_path_has_final_batchnorm_and_no_fc_norm():
    model = VSRN(make_opt(data_name="f30k_precomp"))
    assert isinstance(model.img_enc.bn, nn.BatchNorm1d)
    assert "bn.running_mean" in model.img_enc.state_dict()


def test_rs_gcn_is_identity_at_init_and_matches_conv_form():
    torch.manual_seed(0)
    gcn = Rs_GCN(8, 8)
    v = torch.randn(2, 8, 5)
    torch.testing.assert_close(gcn(v), v)
    randomize(gcn)
    gcn.eval()
    R = torch.matmul(gcn.theta(v).permute(0, 2, 1), gcn.phi(v)) / 5
    expected = gcn.W(torch.matmul(R, gcn.g(v).permute(0, 2, 1)).permute(0, 2, 1)) + v
    torch.testing.assert_close(gcn(v), expected, atol=1e-5, rtol=1e-5)


def test_fc_init_is_xavier_uniform_with_zero_bias():
    torch.manual_seed(0)
    fc = VSRN(make_opt(img_dim=2048, embed_size=64, dim_vid=64)).img_enc.fc
    bound = (6.0 / (2048 + 64)) ** 0.5
    assert fc.weight.abs().max() <= bound and fc.weight.abs().max() > 0.95 * bound
    assert torch.count_nonzero(fc.bias) == 0


def test_contrastive_loss_on_hand_made_scores():
    im = torch.eye(3)
    s = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 0.2]])
    # scores = im @ s.T = [[1, .5, 0], [0, .5, 0], [0, 0, .2]]; diagonal 1, .5, .2; margin .2
    # caption retrieval (rows): row0 max(0,.2+.5-1)=0, .2+0-1<0 -> 0; row1 .2+0-.5<0, .2+0-.5<0 -> 0;
    # row2: .2+0-.2=0 twice -> 0. image retrieval (columns): col0: .2+0-1<0 -> 0;
    # col1: .2+.5-.5=.2 (row0), .2+0-.5<0 -> .2; col2: .2+0-.2=0 -> 0. Total 0.2.
    assert ContrastiveLoss(margin=0.2)(im, s).item() == pytest.approx(0.2)
    assert ContrastiveLoss(margin=0.2, max_violation=True)(im, s).item() == pytest.approx(0.2)
    s2 = torch.tensor([[0.1, 0, 0], [0.9, 0.3, 0], [0.4, 0, 0.2]])
    # scores rows: [[.1,.9,.4],[0,.3,0],[0,0,.2]]
    # cost_s (row i vs its diagonal): row0: .2+.9-.1=1.0, .2+.4-.1=.5; row1: none; row2: none -> sum 1.5, max 1.0
    # cost_im (col j vs diagonal j): col0: .2+0-.1=.1 twice -> .2 ; col1: .2+.9-.3=.8; col2: .2+.4-.2=.4
    assert ContrastiveLoss(margin=0.2)(im, s2).item() == pytest.approx(1.5 + 0.2 + 0.8 + 0.4)
    assert ContrastiveLoss(margin=0.2, max_violation=True)(im, s2).item() == pytest.approx(1.0 + 0.1 + 0.8 + 0.4)


def test_contrastive_loss_collapse_value_is_two_batch_margin():
    emb = F.normalize(torch.ones(5, 4), dim=1)
    assert ContrastiveLoss(0.2, max_violation=True)(emb, emb).item() == pytest.approx(2 * 5 * 0.2)
    assert ContrastiveLoss(0.2)(emb, emb).item() == pytest.approx(2 * 5 * 4 * 0.2)


def test_order_similarity():
    im = torch.tensor([[1.0, 1.0]])
    s = torch.tensor([[1.0, 1.0], [4.0, 5.0], [0.0, 0.0]])
    assert order_sim(im, s).tolist() == [[0.0, -5.0, 0.0]]


def caption_batch(vocab_size, lengths, max_len):
    generator = torch.Generator().manual_seed(1)
    captions = [
        torch.cat([torch.tensor([1]), torch.randint(4, vocab_size, (n - 2,), generator=generator), torch.tensor([2])])
        for n in lengths
    ]
    labels, masks = zip(*(caption_branch_target(c, max_len) for c in captions))
    return torch.stack(labels), torch.stack(masks)


@pytest.mark.parametrize("bidirectional", [0, 1])
def test_caption_decoder_equals_the_original_step_by_step_loop(bidirectional):
    torch.manual_seed(0)
    model = VSRN(make_opt(bidirectional=bidirectional, max_len=12))
    model.val_start()  # no dropout
    regions = torch.randn(4, 36, 32)
    labels, masks = caption_batch(60, [9, 7, 5, 12], 12)
    with torch.no_grad():
        logprobs, preds = model.caption_model(regions, labels, "train")
        expected = reference_caption.caption_logprobs(model.caption_model, regions, labels)
    assert logprobs.shape == (4, 11, 60) and preds.shape == (4, 11)
    torch.testing.assert_close(logprobs, expected, atol=1e-5, rtol=1e-5)


def test_caption_loss_stopping_at_last_target_is_exact():
    torch.manual_seed(0)
    model = VSRN(make_opt(max_len=20))
    model.val_start()
    regions = torch.randn(3, 36, 32, requires_grad=True)
    labels, masks = caption_batch(60, [6, 8, 4], 20)
    steps = caption_steps(masks, 20)
    assert steps == 8  # longest caption: 8 ids, so targets 1..7 plus its first pad
    full = model.caption_model.loss(regions, labels, masks)
    torch.testing.assert_close(full, reference_caption.caption_loss(model.caption_model, regions, labels, masks))
    (grad_full,) = torch.autograd.grad(full, regions)
    short = model.caption_model.loss(regions, labels, masks, steps)
    (grad_short,) = torch.autograd.grad(short, regions)
    torch.testing.assert_close(short, full)
    torch.testing.assert_close(grad_short, grad_full)


def test_state_dict_keys_are_the_originals():
    model = VSRN(make_opt(data_name="f30k_precomp"))
    img, txt, cap = model.state_dict()
    assert sorted(txt) == ["embed.weight", "rnn.bias_hh_l0", "rnn.bias_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l0"]
    assert {
        "fc.weight",
        "Rs_GCN_4.W.1.running_var",
        "Rs_GCN_1.theta.weight",
        "bn.weight",
        "img_rnn.weight_hh_l0",
    } <= set(img)
    assert sorted(cap) == sorted(
        ["encoder.vid2hid.weight", "encoder.vid2hid.bias"]
        + [f"encoder.rnn.{k}" for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")]
        + [
            "decoder.embedding.weight",
            "decoder.attention.linear1.weight",
            "decoder.attention.linear1.bias",
            "decoder.attention.linear2.weight",
            "decoder.out.weight",
            "decoder.out.bias",
        ]
        + [f"decoder.rnn.{k}" for k in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")]
    )


def test_vsrn_updates_the_caption_branch_twice_by_default_each_parameter_listed_once():
    model = VSRN(make_opt())
    optimizer = model.optimizer
    assert optimizer.caption_updates == 2
    params = optimizer.param_groups[0]["params"]
    assert len(params) == len({id(p) for p in params}) == sum(1 for m in model.modules() for _ in m.parameters())
    assert {id(p) for p in optimizer.caption_params} == {id(p) for p in model.caption_model.parameters()}
    assert {id(p) for p in optimizer.retrieval_params} == {
        id(p) for m in (model.img_enc, model.txt_enc) for p in m.parameters()
    }
    assert VSRN(make_opt(caption_updates=1)).optimizer.caption_updates == 1
    assert VSRN(make_opt(), training=False).optimizer is None


def test_dim_vid_must_equal_embed_size():
    with pytest.raises(OptionError, match="--dim_vid 16 must equal --embed_size 32"):
        VSRN(make_opt(dim_vid=16))


def test_raw_image_data_name_is_refused():
    with pytest.raises(OptionError, match="--data_name f30k: only precomputed features"):
        VSRN(make_opt(data_name="f30k"))


def test_load_state_dict_accepts_two_part_lists_and_names_mismatches():
    source = VSRN(make_opt())
    target = VSRN(make_opt())
    target.load_state_dict(source.state_dict()[:2])
    torch.testing.assert_close(target.txt_enc.embed.weight, source.txt_enc.embed.weight)
    other_vocab = VSRN(make_opt(vocab_size=70))
    with pytest.raises(
        CheckpointError,
        match=r"txt_enc.embed.weight has shape \(60, 16\), the model expects \(70, 16\) \(vocabulary size",
    ):
        other_vocab.load_state_dict(source.state_dict(), source="x.pth.tar")
    with pytest.raises(CheckpointError, match="img_enc does not fit this model"):
        VSRN(make_opt(data_name="f30k_precomp")).load_state_dict(source.state_dict())


def test_training_steps_lower_the_loss(toy_data):
    from vocab import load_vocab_by_name
    from data import PrecompDataset

    data_path, vocab_path = toy_data
    vocab = load_vocab_by_name(vocab_path, "toy_precomp")
    torch.manual_seed(0)
    opt = make_opt(vocab_size=len(vocab), learning_rate=1e-3)
    dataset = PrecompDataset(f"{data_path}/toy_precomp", "train", vocab, opt.max_len, opt.img_dim)
    batch = collate_fn([dataset[i] for i in range(0, 64, 2)])
    model = VSRN(opt)
    model.train_start()
    losses = [model.train_emb(*batch) for _ in range(20)]
    assert losses[-1]["Le"] < 0.8 * losses[0]["Le"]
    assert losses[-1]["Le_retrieval"] < 0.8 * losses[0]["Le_retrieval"]
    assert losses[-1]["Le_caption"] < 0.98 * losses[0]["Le_caption"]
    assert model.Eiters == 20


def test_non_finite_loss_raises_before_any_update(toy_data):
    model = VSRN(make_opt())
    images = torch.full((2, 36, 32), float("nan"))
    labels, masks = caption_batch(60, [5, 4], 20)
    params = [p for module in model.modules() for p in module.parameters()]
    before = [p.detach().clone() for p in params]
    with pytest.raises(FloatingPointError, match="loss is not finite at iteration 1"):
        model.train_emb(images, labels[:, :5], [5, 4], (0, 1), labels, masks)
    assert all(torch.equal(a, b) for a, b in zip(before, params))
