"""Tests for secat.py: tokenizers, refusals, episodes and templates, noun matching, Frozen's episode files,
masked loss, GPT-2 loading, greedy copying, DDP, bf16, resume."""
import argparse
import contextlib
import json
import math
import os
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluate  # noqa: E402
import secat  # noqa: E402
from conftest import (draw_from_every_stream, one_run_and_two_pieces, own_photos,  # noqa: E402
                      own_video_and_tiny_world, run_demo)


def _convnet():
    """The demo's frozen encoder (evaluate.stored_backbone's conv net) at half its width: (B, 3, H, W) -> (B, 64)."""
    net = torch.nn.Sequential(*evaluate.conv_stages((16, 32, 64, 64)), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    net.out_dim = 64
    return net


# ---------------------------------------------------------------- tokenizers
def test_byte_tokenizer_round_trips_any_unicode_name():
    tok = secat.load_tokenizer(None)  # an LM from scratch reads bytes
    names = ["striped ring", "Ærøskøbing", "狐狸", "crème brûlée", "🦊 fox", "e\u0301", "naïve-Ω", "",
             " \n\t"]
    rng = np.random.default_rng(0)
    for _ in range(200):  # random code points from the whole range, surrogates excluded
        cps = rng.integers(1, 0x10FFFF, rng.integers(1, 12))
        names.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
    for name in names:
        ids = tok.encode(name)
        assert len(ids) == len(name.encode("utf-8")) and all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eos not in ids and tok.decode(ids) == name


def _bpe_folder(folder, fmt):
    """A tiny GPT-2-style byte-level BPE: 10 byte tokens (space is GPT-2's "Ġ"), 4 merges, <|endoftext|>."""
    vocab = {t: i for i, t in enumerate(["a", "d", "x", "s", "'", "\u0120", ",", "1", "2", "3",
                                          "\u0120d", "ax", "\u0120dax", "12", "<|endoftext|>"])}
    merges = [["\u0120", "d"], ["a", "x"], ["\u0120d", "ax"], ["1", "2"]]
    os.makedirs(folder, exist_ok=True)
    if fmt == "vocab+merges":
        (folder / "vocab.json").write_text(json.dumps(vocab))
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(" ".join(m) + "\n" for m in merges),
                                           encoding="utf-8")
    else:  # as Hugging Face writes a GPT-2 tokenizer.json
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        tok = Tokenizer(models.BPE(vocab, [tuple(m) for m in merges]))
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
        tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("fmt", ["vocab+merges", "tokenizer.json"])
def test_bpe_tokenizer_gives_gpt2s_ids_on_a_small_vocabulary(tmp_path, fmt):
    tok = secat.load_tokenizer(str(_bpe_folder(tmp_path / "lm", fmt)))
    # by hand: pieces "a" " dax" "," " a" " dax" "'s" " 123"; " dax" = Ġ d a x -> Ġd a x -> Ġd ax -> Ġdax
    # (ranks 0, 1, 2); " a" and "'s" have no merge; " 123" = Ġ 1 2 3 -> Ġ 12 3
    ids = tok.encode("a dax, a dax's 123")
    assert ids == [0, 12, 6, 5, 0, 12, 4, 3, 5, 13, 9]
    assert tok.decode(ids + [tok.eos]) == "a dax, a dax's 123" and tok.eos == 14 and tok.vocab_size == 15
    # \p{L} / \p{N} as GPT-2's pattern has them ("½" is a number, "ï" a letter; stdlib [^\W\d_] would call "½"
    # a letter)
    from tokenizers import decoders
    pre = tok.tokenizer.pre_tokenizer.pre_tokenize_str("x½ 3.5 naïve don't  \n")
    pieces = [decoders.ByteLevel().decode([p]) for p, _ in pre]
    assert pieces == ["x", "½", " 3", ".", "5", " naïve", " don", "'t", "  \n"]


def test_a_pretrained_lm_without_its_tokenizer_files_is_refused(tmp_path):
    (tmp_path / "lm").mkdir()
    _write_safetensors(_hf_gpt2_state(vocab=300), tmp_path / "lm" / "model.safetensors")
    args = secat.get_args(["--data", "unused", "--lm", str(tmp_path / "lm"), "--encoder", "unused"])
    # never the byte tokenizer with a pretrained LM
    with pytest.raises(secat.data.DataError, match="no tokenizer files"):
        secat.build_model(args, _convnet())
    _bpe_folder(tmp_path / "lm", "vocab+merges")
    model, tok = secat.build_model(args, _convnet())
    assert isinstance(tok, secat.data.BPETokenizer) and model.lm.wte.weight.shape[0] == 300
    assert args.pseudo_names == "nouns"  # the paper's names are the default with a pretrained LM


@pytest.mark.parametrize("given,missing", [([], "--encoder and --lm"), (["--encoder", "e.pth"], "--lm"),
                                           (["--lm", "gpt2/"], "--encoder")])
def test_full_scale_without_a_pretrained_encoder_or_lm_is_refused_before_any_work(tmp_path, capsys, given, missing):
    args = secat.get_args(["--data", str(tmp_path / "none"), "--output-dir", str(tmp_path / "out"), *given])
    with pytest.raises(secat.data.DataError) as e:
        secat.main(args)
    assert str(e.value).startswith(f"secat.py: {missing} required outside --demo") and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- episodes and loss
def _members(clusters=6, per_cluster=5):
    return [list(range(c * per_cluster, (c + 1) * per_cluster)) for c in range(clusters)]


@pytest.mark.parametrize("ways,shots", [(2, 1), (3, 2), (5, 4)])
def test_episode_has_nk_supports_and_a_query_of_one_of_the_n_classes(ways, shots):
    members = _members()
    cluster_of = {i: c for c, m in enumerate(members) for i in m}
    rng = np.random.default_rng(0)
    seen_names = set()
    for _ in range(30):
        e = secat.sample_episode(members, ways, shots, rng)
        assert len(e["images"]) == len(e["texts"]) == ways * shots + 1 == len(e["clusters"])
        support, query = e["images"][:-1], e["images"][-1]
        assert [cluster_of[i] for i in e["images"]] == e["clusters"]  # clusters recorded truthfully
        assert len(set(e["clusters"][:-1])) == ways and all(e["clusters"][:-1].count(c) == shots for c in e["names"])
        assert e["clusters"][-1] in e["clusters"][:-1] and query not in support
        # names: one per cluster, distinct, each caption names its image's cluster, answer = the query's name
        assert len(set(e["names"].values())) == ways
        assert e["texts"][:-1] == [secat.CAPTION.format(e["names"][c]) for c in e["clusters"][:-1]]
        assert e["texts"][-1] == secat.PROMPT and e["answer"] == e["names"][e["clusters"][-1]]
        seen_names |= set(e["names"].values())
    assert len(seen_names) > 30 * ways * 0.8  # re-drawn per episode
    fixed = secat.sample_episode(members, ways, shots, rng, cluster_names=[f"noun{c}" for c in range(6)])
    assert all(name == f"noun{c}" for c, name in fixed["names"].items())  # matched nouns stay with their cluster


def test_training_wording_is_not_the_evaluations_with_a_pretrained_lm(tmp_path):
    assert (secat.CAPTION, secat.PROMPT) == ("Here is a {}.", "What is here? Here is a")
    assert (secat.EVAL_CAPTION, secat.EVAL_PROMPT) == ("This is a {}.", "What is this? This is a")
    assert len(secat.CAPTION) == len(secat.EVAL_CAPTION) and len(secat.PROMPT) == len(secat.EVAL_PROMPT)
    pretrained, scratch = secat.get_args(["--data", "x", "--lm", "gpt2/"]), secat.get_args(["--data", "x"])
    assert secat.wording(pretrained) == (secat.CAPTION, secat.PROMPT)
    assert secat.wording(scratch) == (secat.EVAL_CAPTION, secat.EVAL_PROMPT)  # an LM from scratch: one wording
    e = secat.make_batch(0, _members(), pretrained, 1)[0]
    assert e["texts"][0].startswith("Here is a ") and e["texts"][-1] == secat.PROMPT
    seen = []
    evaluate.icl(lambda im, t: seen.append(t) or "", _coded_folder(tmp_path), ways=2, shots=1, episodes=1,
                 task_induction=False)
    assert seen[0][0].startswith("This is a ") and seen[0][-1] == secat.EVAL_PROMPT  # evaluate.icl: Frozen's wording


def test_match_nouns_is_one_to_one_where_greedy_would_collide():
    # byte tokens: " a" -> [32, 97]; wte[32] = 0, so a noun's embedding is half its letter's row
    lm = types.SimpleNamespace(wte=torch.nn.Embedding(258, 2))
    with torch.no_grad():
        lm.wte.weight.zero_()
        lm.wte.weight[97], lm.wte.weight[98] = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # "a", "b"
    model = types.SimpleNamespace(lm=lm, mapper=lambda f: f[:, None])  # identity mapper, one prefix token
    prototypes = torch.tensor([[1.0, 0.5], [1.0, 0.2]])  # both nearer "a"; cosines a: .894, .981  b: .447, .196
    # one to one: c0 -> b, c1 -> a sums to 1.428 > 1.090 for c0 -> a, c1 -> b
    assert secat.match_nouns(model, secat.load_tokenizer(), prototypes, ["a", "b"]) == ["b", "a"]
    names = secat.match_nouns(model, secat.load_tokenizer(), torch.randn(5, 2), ["a", "b"])  # more clusters than nouns
    assert len(set(names)) == 5 and all(w in ("a", "b") for n in names for w in n.split())


def test_noun_names_skip_the_evaluation_words(tmp_path):
    for name in ("striped_star", "copper kettle"):  # class folders: real names, "_" read as a space
        (tmp_path / name).mkdir()
    vocabulary = secat.name_vocabulary("nouns", str(tmp_path))
    assert "copper" not in vocabulary and "kettle" not in vocabulary and "owl" in vocabulary
    assert secat.name_vocabulary("nonsense", str(tmp_path)) is None
    assert len(secat.name_vocabulary("nouns")) == len(secat.NOUNS)
    names = secat.pseudo_names(200, np.random.default_rng(0), vocabulary)
    assert names == secat.pseudo_names(200, np.random.default_rng(0), vocabulary)  # deterministic from the seed
    words = [n.split() for n in names]
    assert all(w in vocabulary for ws in words for w in ws) and {len(ws) for ws in words} == {1, 2}
    e = secat.sample_episode(_members(), 3, 1, np.random.default_rng(1), vocabulary)
    assert all(w in vocabulary for n in e["names"].values() for w in n.split())


def test_noun_names_skip_the_class_names_of_wnid_folders(tmp_path):
    """--class-names maps wnid folders to their names: the vocabulary leaves out the names' words, not the wnids'."""
    (tmp_path / "val" / "n01").mkdir(parents=True)
    (tmp_path / "names.txt").write_text("n01 copper kettle\n")
    args = secat.get_args(["--data", str(tmp_path), "--encoder", "dino.pth", "--lm", "gpt2", "--pseudo-names", "nouns",
                           "--eval-data", str(tmp_path / "val"), "--class-names", str(tmp_path / "names.txt")])
    assert "kettle" not in args.vocabulary and "copper" not in args.vocabulary and "owl" in args.vocabulary


def test_loss_counts_only_the_answer_tokens():
    tok = secat.load_tokenizer()
    episodes = [secat.sample_episode(_members(), 2, 2, np.random.default_rng(s)) for s in range(3)]
    ids, slots, targets, feats = secat.collate(episodes, torch.randn(30, 8), tok, 2, "cpu")
    assert feats.shape[0] == slots.sum() // 2 == 3 * 5
    for b, e in enumerate(episodes):  # the targets spell exactly " <answer>." then <eos>
        assert ids[b][targets[b]].tolist() == tok.encode(" " + e["answer"] + ".") + [tok.eos]
    logits = torch.randn(*ids.shape, tok.vocab_size, requires_grad=True)
    n = int(targets.sum())
    loss = secat.answer_loss(logits, ids, targets, n)
    loss.backward()
    has_grad = logits.grad.abs().sum(-1) > 0
    predicts_answer = torch.zeros_like(targets)
    predicts_answer[:, :-1] = targets[:, 1:]  # position t predicts token t+1
    assert torch.equal(has_grad, predicts_answer)
    # and it is the mean cross-entropy of those predictions
    rows, cols = predicts_answer.nonzero(as_tuple=True)
    assert torch.allclose(loss, F.cross_entropy(logits[rows, cols], ids[rows, cols + 1]))


def test_text_warmup_batches_are_caption_lists_with_every_token_a_target():
    args = secat.get_args(["--data", "unused"])
    tok = secat.load_tokenizer()
    batch = secat.text_batch(3, args, tok, 4)
    assert batch == secat.text_batch(3, args, tok, 4)  # a function of (seed, step): resumable
    ids, slots, targets, feats = secat.collate(batch, torch.randn(5, 8), tok, 2, "cpu")
    assert feats.shape == (0, 8) and not slots.any()
    for b, e in enumerate(batch):
        lines = e["text"].split("\n")
        assert all(line.startswith("This is a ") and line.endswith(".") for line in lines)  # from scratch: Frozen's
        assert len(set(lines)) < len(lines) or len(lines) <= 4  # names repeat: copying pays off
        assert ids[b][targets[b]].tolist() == tok.encode(e["text"])


def test_alibi_bias_is_minus_slope_times_distance_and_hides_the_future():
    inf = float("-inf")
    bias = secat.alibi_bias(3, 2, "cpu")  # slopes 2^(-8*1/2) = 1/16 and 2^(-8*2/2) = 1/256
    assert torch.equal(bias[0], torch.tensor([[0, inf, inf], [-1 / 16, 0, inf], [-2 / 16, -1 / 16, 0]]))
    assert torch.equal(bias[1], torch.tensor([[0, inf, inf], [-1 / 256, 0, inf], [-2 / 256, -1 / 256, 0]]))
    torch.manual_seed(0)
    attn = secat.CausalSelfAttention(8, 2, "alibi")
    x = torch.randn(1, 5, 8)
    q, k, v = attn.c_attn(x)[0].split(8, dim=1)
    q, k, v = (t.reshape(5, 2, 4).transpose(0, 1) for t in (q, k, v))  # (heads, L, 4)
    att = (q @ k.transpose(1, 2) / 2 + secat.alibi_bias(5, 2, "cpu")).softmax(-1)  # softmax(qk/sqrt(d) + bias)
    assert torch.allclose(attn(x)[0], attn.c_proj((att @ v).transpose(0, 1).reshape(5, 8)), atol=1e-6)
    lm, y = secat.GPT(258, 16, 8, layers=2, heads=2, positions="alibi").eval(), x.clone()
    y[0, 3:] = torch.randn(2, 8)  # later positions changed: earlier outputs are not
    assert torch.allclose(lm(x)[0, :3], lm(y)[0, :3], atol=1e-6) and not torch.allclose(lm(x)[0, 3:], lm(y)[0, 3:])


# ---------------------------------------------------------------- GPT-2 weights
def _hf_gpt2_state(vocab=300, context=32, dim=64, layers=2, seed=0):
    """A randomly initialised state dict in HF GPT2LMHeadModel's layout (Conv1D weights (in, out))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    sd = {"transformer.wte.weight": r(vocab, dim), "transformer.wpe.weight": r(context, dim),
          "transformer.ln_f.weight": 1 + r(dim), "transformer.ln_f.bias": r(dim)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(dim), p + "ln_1.bias": r(dim),
                   p + "ln_2.weight": 1 + r(dim), p + "ln_2.bias": r(dim),
                   p + "attn.c_attn.weight": r(dim, 3 * dim), p + "attn.c_attn.bias": r(3 * dim),
                   p + "attn.c_proj.weight": r(dim, dim), p + "attn.c_proj.bias": r(dim),
                   p + "mlp.c_fc.weight": r(dim, 4 * dim), p + "mlp.c_fc.bias": r(4 * dim),
                   p + "mlp.c_proj.weight": r(4 * dim, dim), p + "mlp.c_proj.bias": r(dim),
                   p + "attn.bias": torch.tril(torch.ones(1, 1, context, context)),
                   p + "attn.masked_bias": torch.tensor(-1e4)})
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def _reference_gpt2(sd, ids, heads):
    """GPT-2's forward written out with HF's conventions (x @ W + b), independent of secat.GPT."""
    w = {k.removeprefix("transformer."): v for k, v in sd.items()}
    x = w["wte.weight"][ids] + w["wpe.weight"][: len(ids)]
    L, D = x.shape
    ln = lambda x, p: F.layer_norm(x, (D,), w[p + ".weight"], w[p + ".bias"])  # noqa: E731
    mask = torch.tril(torch.ones(L, L, dtype=torch.bool))
    for i in range(1 + max(int(k.split(".")[1]) for k in w if k.startswith("h."))):
        p = f"h.{i}."
        q, k, v = (ln(x, p + "ln_1") @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]).split(D, dim=1)
        q, k, v = (t.reshape(L, heads, D // heads).transpose(0, 1) for t in (q, k, v))
        att = (q @ k.transpose(1, 2) / (D // heads) ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        x = x + (att @ v).transpose(0, 1).reshape(L, D) @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        h = F.gelu(ln(x, p + "ln_2") @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"], approximate="tanh")
        x = x + h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ w["lm_head.weight"].t()


def _write_safetensors(sd, path):
    header, blobs, offset = {}, [], 0
    for k, v in sd.items():
        b = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
        blobs.append(b)
        offset += len(b)
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h + b"".join(blobs))


@pytest.mark.parametrize("fmt", ["bin", "safetensors", "config"])
def test_gpt2_hf_folder_loads_and_matches_a_reference_forward(tmp_path, fmt):
    sd = _hf_gpt2_state()
    if fmt == "bin":
        # un-prefixed too
        torch.save({k.removeprefix("transformer."): v for k, v in sd.items()}, tmp_path / "pytorch_model.bin")
    else:
        _write_safetensors({k: v for k, v in sd.items() if k != "lm_head.weight"}, tmp_path / "model.safetensors")
        if fmt == "config":
            (tmp_path / "config.json").write_text(json.dumps({"n_head": 4}))
    lm = secat.load_lm(str(tmp_path))
    assert (lm.dim, len(lm.h), lm.context, lm.wte.weight.shape[0]) == (64, 2, 32, 300)
    ids = torch.tensor([5, 17, 250, 3, 99, 42, 7])
    heads = 4 if fmt == "config" else 1  # without config.json: GPT-2's 64-wide heads -> 64 // 64 = 1
    assert lm.h[0].attn.heads == heads
    with torch.no_grad():
        ours = lm(lm.wte(ids)[None])[0]
    assert torch.allclose(ours, _reference_gpt2(sd, ids, heads), atol=1e-4)


# ---------------------------------------------------------------- greedy decoding
def _copy_model(vocab=258, context=16, copy_from=1):
    """A 1-layer GPT whose only head attends to position `copy_from` and writes that token into
    the residual stream; the tied output layer then predicts it. Embedding = [one-hot token | one-hot position]."""
    dim = vocab + context
    lm = secat.GPT(vocab, context, dim, layers=1, heads=1)
    model = secat.SeCAt(_convnet(), secat.VisualMapper(64, dim, 1), lm).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.zero_()
        for ln in (lm.h[0].ln_1, lm.h[0].ln_2, lm.ln_f):
            ln.weight.fill_(1.0)
        lm.wte.weight[:, :vocab] = torch.eye(vocab)
        lm.wpe.weight[:, vocab:] = torch.eye(context)
        W, b = lm.h[0].attn.c_attn.weight, lm.h[0].attn.c_attn.bias
        b[0] = 10.0  # query: a constant
        W[dim, vocab + copy_from] = 10.0  # key: large only at position `copy_from`
        W[2 * dim:2 * dim + vocab, :vocab] = torch.eye(vocab)  # value: the token
        lm.h[0].attn.c_proj.weight[:vocab, :vocab] = 10 * torch.eye(vocab)
    return model


def test_greedy_decoding_copies_the_context_token():
    tok = secat.load_tokenizer()
    model = _copy_model()
    no_images = torch.zeros(0, 64)
    ids = torch.tensor([tok.eos] + tok.encode("Qabc"))
    slots = torch.zeros(len(ids), dtype=torch.bool)
    assert tok.decode(secat.greedy_decode(model, ids, slots, no_images, tok.eos, max_new_tokens=3)) == "QQQ"
    ids = torch.tensor([tok.eos] + tok.encode("Zxy"))
    assert tok.decode(secat.greedy_decode(model, ids, slots[:4], no_images, tok.eos, max_new_tokens=2)) == "ZZ"
    ids = torch.tensor([tok.eos, tok.eos] + tok.encode("xy"))  # copying <eos> ends the answer at once
    assert secat.greedy_decode(model, ids, slots[:4], no_images, tok.eos) == []


# ---------------------------------------------------------------- evaluation: Frozen's episode files, wnid folders
def _flat(path, value):
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _coded_folder(root, classes=("n01", "n02", "n03"), per_class=3):
    """ImageFolder whose images of class c are flat grey 60 * (c + 1)."""
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(per_class):
            _flat(os.path.join(root, name, f"{i}.png"), 60 * (c + 1))
    return secat.data.ImageFolder(str(root))


def _copier(seen):
    """A perfect reader: answers the name in the caption after the support that looks like the query."""
    def generate(images, texts):
        seen.append(texts)
        support = [t[len("This is a "):-1] for im, t in zip(images, texts) if torch.equal(im, images[-1])]
        return support[0] if len(support) > 1 or len(images) > 1 else "?"
    return generate


def _frozen_folder(root):
    """Frozen's layout (evaluate.frozen_episodes): two 2-way 1-shot questions; the query is of the answer's class."""
    root.mkdir()
    questions = []
    for q, (names, answer) in enumerate([(["dax", "blicket"], "blicket"), (["blicket", "dax"], "blicket")]):
        entry = {"question_id": q, "question": "What is this?", "answer": answer,
                 "question_image": f"q{q}_question.png"}
        value = {"dax": 50, "blicket": 200}
        for i, name in enumerate(names, 1):
            entry[f"image_{i}"], entry[f"caption_{i}"] = f"q{q}_image_{i}.png", f"This is a {name}."
            _flat(root / entry[f"image_{i}"], value[name])
        _flat(root / entry["question_image"], value[answer])
        questions.append(entry)
    (root / "open_ended_mi_shots_1_ways_2_all_questions.json").write_text(json.dumps(questions))
    return root


def test_frozen_episode_files_are_read_as_released_with_and_without_task_induction_and_repeats(tmp_path):
    seen = []
    res = evaluate.icl_frozen(_copier(seen), str(_frozen_folder(tmp_path / "open_ended_mi")), ways=2, shots=1,
                              repeats=(0, 1))
    assert res["frozen/2way_1shot"] == res["frozen/2way_1shot_induction_1repeats"] == 100
    assert res["frozen/2way_1shot_chance"] == 50 and res["frozen/2way_1shot_in_context"] == 100
    assert seen[0] == ["This is a dax.", "This is a blicket.", "What is this? This is a"]  # the file's order
    assert seen[1][:2] == ["This is a blicket.", "This is a dax."]
    assert seen[2] == seen[0][:2] * 2 + [seen[0][2]]  # 1 repeat: the support shown twice
    assert {seen[4][-1], seen[5][-1]} <= {"Answer with dax or blicket. What is this? This is a",
                                          "Answer with blicket or dax. What is this? This is a"}
    res = evaluate.icl_frozen(lambda im, t: "wug", str(tmp_path / "open_ended_mi"), 2, 1, False)
    assert res["frozen/2way_1shot"] == 0 and "frozen/2way_1shot_induction" not in res
    with pytest.raises(secat.data.DataError, match="shots_3_ways_2"):
        evaluate.frozen_episodes(str(tmp_path / "open_ended_mi"), 2, 3)


def test_wnid_folders_get_names_from_the_users_file_and_open_ended_uses_frozens_words(tmp_path):
    _coded_folder(tmp_path / "val")
    (tmp_path / "names.txt").write_text("n01 house finch, linnet\nn02 goldfish, Carassius auratus\nn03 dugong\n")
    (tmp_path / "names.json").write_text(json.dumps({"n01": "house finch", "n02": "goldfish", "n03": "dugong"}))
    assert evaluate.read_class_names(tmp_path / "names.txt") == evaluate.read_class_names(tmp_path / "names.json")
    seen = []
    res = evaluate.run_icl(_copier(seen), str(tmp_path / "val"), ways=(2,), shots=(1,), episodes=6,
                           class_names=str(tmp_path / "names.txt"))
    assert res["real/icl/2way_1shot"] == res["open/icl/2way_1shot_induction"] == 100
    real, open_ended = seen[:6], seen[12:18]
    assert {t[len("This is a "):-1] for texts in real for t in texts[:-1]} <= {"house finch", "goldfish", "dugong"}
    assert all(sorted(texts[:-1]) == ["This is a blicket.", "This is a dax."] for texts in open_ended)
    _coded_folder(tmp_path / "words", ("striped_star", "dotted_ring"))  # folder names are written as words
    seen = []
    res = evaluate.run_icl(_copier(seen), str(tmp_path / "words"), (2,), (1,), 2, task_induction=False)
    assert sorted(seen[0][:-1]) == ["This is a dotted ring.", "This is a striped star."]
    assert res["real/icl/2way_1shot"] == 100
    with pytest.raises(secat.data.DataError, match="no name for the folders"):
        (tmp_path / "short.txt").write_text("n01 house finch\n")
        evaluate.run_icl(_copier([]), str(tmp_path / "val"), (2,), (1,), 1, class_names=str(tmp_path / "short.txt"))


# ---------------------------------------------------------------- training steps
def _setup(seed=0, global_batch=4):
    args = secat.get_args(["--data", "unused", "--lm-dim", "32", "--lm-layers", "2", "--lm-heads", "2",
                           "--context", "256", "--prefix-tokens", "2", "--max-ways", "3", "--max-shots", "2"])
    torch.manual_seed(seed)
    model, tok = secat.build_model(args, _convnet())
    feats = torch.randn(30, 64)
    batches = [secat.make_batch(step, _members(), args, global_batch) for step in range(2)]
    return model, tok, feats, batches, args


def _steps(model, tok, feats, batches, args, rank=0, world=1, amp=contextlib.nullcontext()):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    losses = []
    for episodes in batches:
        n = sum(len(tok.encode(" " + e["answer"] + ".")) + 1 for e in episodes)
        batch = secat.collate(episodes[rank::world], feats, tok, args.prefix_tokens, "cpu")
        losses.append(secat.train_step(ddp, optimizer, scaler, batch, n, world, amp, clip_grad=0)["loss"])
    return losses


def _ddp_worker(rank, world, init_file, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=world)
    model, tok, feats, batches, args = _setup()
    losses = _steps(model, tok, feats, batches, args, rank, world)
    summed = torch.tensor(losses)
    torch.distributed.all_reduce(summed)
    if rank == 0:
        torch.save({"model": model.state_dict(), "losses": summed}, out)
    torch.distributed.destroy_process_group()


def test_two_process_gloo_ddp_step_equals_one_process_step(tmp_path):
    model, tok, feats, batches, args = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = _steps(model, tok, feats, batches, args)
    out = str(tmp_path / "two.pt")
    torch.multiprocessing.spawn(_ddp_worker, args=(2, str(tmp_path / "rdv"), out), nprocs=2)
    two = torch.load(out, weights_only=True)
    assert torch.allclose(torch.tensor(losses), two["losses"], atol=1e-5)
    changed = 0
    for k, v in model.state_dict().items():
        assert torch.allclose(v, two["model"][k], atol=1e-5), k
        changed += not torch.equal(v, before[k])
    assert changed > 10  # mapper and LM moved; the frozen encoder did not
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if k.startswith("backbone."))


def test_bf16_autocast_step_on_cpu():
    model, tok, feats, batches, args = _setup()
    fp32 = _steps(model, tok, feats, batches[:1], args)[0]
    model, tok, feats, batches, args = _setup()
    bf16 = _steps(model, tok, feats, batches[:1], args, amp=torch.autocast("cpu", dtype=torch.bfloat16))[0]
    assert math.isfinite(bf16) and abs(bf16 - fp32) < 0.05 * fp32


# ---------------------------------------------------------------- the demo on one's own video
def test_demo_trains_on_ones_own_video_and_evaluates_on_the_synthetic_world(tmp_path):
    # `secat.py --demo --data my_walk.mp4`: the video's frames are the unlabelled pool (once: one "image")
    video = own_video_and_tiny_world(tmp_path)
    result = run_demo("secat", tmp_path, "--data", video, "--output-dir", "out", "--image-size", "32", "--lm-dim", "32",
                      "--lm-layers", "1", "--lm-heads", "2", "--context", "128", "--clusters", "3", "--epochs", "1",
                      "--steps-per-epoch", "2", "--text-warmup-steps", "0", "--batch-size-per-gpu", "2",
                      "--eval-episodes", "2", "--eval-ways", "2")
    assert (tmp_path / "out" / "checkpoint.pth").exists() and (tmp_path / "out" / "episode.png").exists()
    assert result["train_data"] == video and result["eval_data"] == os.path.join("runs", "synth", "objects", "val")
    assert {"selfcontext/2way_1shot", "features/2way_1shot_nn", "real/icl/2way_1shot"} <= set(result)
    assert json.load(open(tmp_path / "out" / "results.json")) == result


# ---------------------------------------------------------------- the whole loop: resume
def _tiny_folder(root, classes=3, per_class=6, size=16):
    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
        for i in range(per_class):
            img = np.clip(rng.normal(80 * c, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(root, f"class_{c}", f"{i}.png"))
    return root


def _train_args(out, root, *extra):
    return secat.get_args(["--data", root, "--output-dir", str(out), "--encoder-arch", "vit_demo", "--patch-size", "8",
                           "--image-size", "16", "--lm-dim", "32", "--lm-layers", "1", "--lm-heads", "2",
                           "--context", "256", "--clusters", "3", "--max-ways", "2", "--max-shots", "1",
                           "--epochs", "3",
                           "--steps-per-epoch", "2", "--batch-size-per-gpu", "3", "--num-workers", "0",
                           "--warmup-epochs", "1", "--lr", "1e-3", "--amp", "none", "--log-every", "1", *extra])


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    root = _tiny_folder(str(tmp_path / "imgs"))
    full = secat.train(_train_args(tmp_path / "full", root))[0]
    assert len((tmp_path / "full" / "log.jsonl").read_text().splitlines()) == 6
    save = secat.data.save_checkpoint

    def save_then_die(state, path):  # the job is killed right after its first checkpoint
        save(state, path)
        raise KeyboardInterrupt

    monkeypatch.setattr(secat.data, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        secat.train(_train_args(tmp_path / "cut", root))
    monkeypatch.setattr(secat.data, "save_checkpoint", save)
    resumed = secat.train(_train_args(tmp_path / "cut", root, "--resume"))[0]
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # the checkpoint loads with weights_only and rebuilds the frozen encoder through build_backbone
    ckpt = secat.data.load_checkpoint(tmp_path / "cut" / "checkpoint.pth")
    enc = secat.build_backbone(ckpt["args"])
    enc.load_state_dict({k[9:]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}, strict=True)
    # and evaluate.py's `icl` bench rebuilds the same model from it: same answer as the trained one
    generate = secat.build_generator(ckpt)
    reference = secat.make_generate(resumed, secat.load_tokenizer(), argparse.Namespace(**ckpt["args"]), "cpu")
    images = [secat.data.load_image(p) for p, _ in secat.data.ImageFolder(root).samples[:3]]
    texts = ["This is a blicket.", "This is a dax.", "What is this? This is a"]
    assert isinstance(generate(images, texts), str)
    assert generate(images, texts) == reference(images, texts)


def test_demo_on_ones_own_photos_in_two_pieces_equals_one_run(tmp_path, monkeypatch):
    # `secat.py --demo --data my_photos --epochs 2` vs `--stop-after 1` then `--resume`, through main: the untrained
    # baseline's evaluation runs mid-epoch 1 (after the text warm-up), the final one after each piece; equal weights
    own_video_and_tiny_world(tmp_path)  # the tiny world at runs/synth, where the demo evaluates
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(secat, "train_demo_encoder", lambda encoder, args: encoder.eval())  # seconds, not a minute
    monkeypatch.setattr(secat, "selfcontext_accuracy", lambda *a: draw_from_every_stream() or 0.0)
    monkeypatch.setattr(evaluate, "run_icl", draw_from_every_stream)
    monkeypatch.setattr(evaluate, "icl_picture", lambda *a, **k: draw_from_every_stream() or ("", ""))
    straight, pieces = one_run_and_two_pieces(
        secat, tmp_path, "--data", own_photos(tmp_path / "photos"), "--image-size", "32", "--lm-dim", "32",
        "--lm-layers", "1", "--lm-heads", "2", "--context", "128", "--clusters", "3", "--steps-per-epoch", "2",
        "--text-warmup-steps", "3", "--batch-size-per-gpu", "2", "--eval-episodes", "2", "--eval-ways", "2")
    assert straight["step"] == pieces["step"] == 4
    for k, v in straight["model"].items():
        assert torch.equal(v, pieces["model"][k]), k


def test_bench_prints_the_episode_batches_and_step_rates_and_their_ratio(tmp_path, capsys, monkeypatch):
    """--bench N (data.bench_train): one JSON line on the self-context batches (after the text warm-up) and one
    training step; ratio = loader rate x workers over the step's rate; no checkpoint, no training."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)  # bench_train sets it; restored after the test
    root = _tiny_folder(str(tmp_path / "imgs"))
    secat.train(_train_args(tmp_path / "out", root, "--text-warmup-steps", "2", "--bench", "2"))
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    keys = {"loader_items_per_s_per_worker", "workers", "step_s", "images_per_s", "peak_memory_gib", "ratio"}
    assert keys <= set(result)
    assert result["step_s"] > 0 and result["loader_items_per_s_per_worker"] > 0
    episodes_per_s = 3 / result["step_s"]  # --batch-size-per-gpu 3
    assert math.isclose(result["images_per_s"] / episodes_per_s, 3)  # 2-way 1-shot: 2 supports and a query each
    assert math.isclose(result["ratio"], result["loader_items_per_s_per_worker"] * result["workers"] / episodes_per_s,
                        rel_tol=1e-6)
    assert not (tmp_path / "out" / "checkpoint.pth").exists()


def test_eval_only_scores_a_checkpoint_as_the_end_of_training_does(tmp_path, capsys):
    """--eval-only CKPT --eval-data DIR (what `evaluate.py icl --ckpt` pointed to): the icl evaluation that ends
    training, on DIR/val when DIR has one, nothing trained; another method's checkpoint is refused in one line."""
    root = _tiny_folder(str(tmp_path / "bench" / "val"))
    model = secat.train(_train_args(tmp_path / "run", root, "--epochs", "1"))[0]
    flags = ["--eval-ways", "2", "--eval-shots", "1", "--eval-episodes", "3"]
    ckpt = str(tmp_path / "run" / "checkpoint.pth")
    before = open(ckpt, "rb").read()
    capsys.readouterr()
    secat.main(secat.get_args(["--eval-only", ckpt, "--eval-data", str(tmp_path / "bench"), *flags]))
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    args = secat.get_args(["--data", root, *flags])
    generate = secat.make_generate(model, secat.load_tokenizer(), args, "cpu")
    expected = evaluate.run_icl(generate, root, args.eval_ways, args.eval_shots, args.eval_episodes, args.seed,
                                None, (False, True), args.eval_repeats, [])
    assert result == {**expected, "ckpt": ckpt, "eval_data": root} and "real/icl/2way_1shot" in expected
    assert any(line.startswith(f"icl on {root} (3 episodes each") for line in out)
    assert open(ckpt, "rb").read() == before and set(os.listdir(tmp_path / "run")) == {"checkpoint.pth", "log.jsonl"}
    torch.save({"method": "sinkhorn", "args": {"arch": "convnet_demo"}, "model": {}}, tmp_path / "sela.pth")
    with pytest.raises(secat.data.CheckpointError, match="not a secat.py checkpoint"):
        secat.main(secat.get_args(["--eval-only", str(tmp_path / "sela.pth"), "--eval-data", root]))


def test_a_checkpoint_of_other_lm_positions_is_refused_in_one_line_and_kept(tmp_path):
    root = _tiny_folder(str(tmp_path / "imgs"))
    secat.train(_train_args(tmp_path / "run", root, "--lm-positions", "learned", "--epochs", "1"))
    path = tmp_path / "run" / "checkpoint.pth"
    before = path.read_bytes()
    with pytest.raises(secat.data.DataError) as e:  # --resume with the default (alibi), before any features
        secat.train(_train_args(tmp_path / "run", root, "--resume"))
    assert "learned positions, this run alibi" in str(e.value) and "\n" not in str(e.value)
    assert path.read_bytes() == before
    ckpt = secat.data.load_checkpoint(path)
    ckpt["args"]["lm_positions"] = "rope"  # what secat.py saved before rotary positions were dropped
    with pytest.raises(secat.data.DataError, match="rope positions .* train it again"):
        secat.build_generator(ckpt)


def test_encoder_loads_from_dino_weights(tmp_path):
    vit = evaluate.build_arch("vit_demo", 8).eval()
    torch.save(vit.state_dict(), tmp_path / "dino.pth")
    args = secat.get_args(["--data", "unused", "--encoder", str(tmp_path / "dino.pth"), "--encoder-arch", "vit_demo",
                           "--patch-size", "8"])
    x = torch.randn(2, 3, 32, 32)
    enc = secat.load_encoder(args)
    assert torch.allclose(enc(x), vit(x)) and secat.feature_dim(enc) == 192
    rebuilt = secat.build_backbone(vars(args))  # what a secat checkpoint's args rebuild
    rebuilt.load_state_dict(enc.state_dict(), strict=True)


def test_a_sinkhorn_conv_net_checkpoint_serves_as_the_frozen_encoder(tmp_path):
    # sinkhorn.py's demo trains a conv net, not a ViT: it is rebuilt by sinkhorn.build_backbone
    import sinkhorn
    torch.manual_seed(0)
    sela = sinkhorn.SeLaNet(sinkhorn.build_backbone({"arch": "convnet_demo"}), 2, 6).eval()
    torch.save({"method": "sinkhorn", "args": {"arch": "convnet_demo", "image_size": 32},
                "model": sela.state_dict()}, tmp_path / "sela.pth")
    args = secat.get_args(["--data", "unused", "--encoder", str(tmp_path / "sela.pth")])
    enc = secat.load_encoder(args)
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(enc(x), sela.backbone(x)) and secat.feature_dim(enc) == enc(x).shape[1]
    rebuilt = secat.build_backbone(vars(args))  # what evaluate.py does with a secat checkpoint's args
    rebuilt.load_state_dict(enc.state_dict(), strict=True)
    assert torch.allclose(rebuilt.eval()(x), enc(x))


def test_kmeans_clustering_finds_separated_groups():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    feats = centres.repeat_interleave(25, 0) + torch.randn(100, 16, generator=g)
    labels = secat.cluster_features(feats, 4, seed=0)
    assert sorted(torch.bincount(labels, minlength=4).tolist()) == [25, 25, 25, 25]
    assert all(len(set(labels[i * 25:(i + 1) * 25].tolist())) == 1 for i in range(4))
