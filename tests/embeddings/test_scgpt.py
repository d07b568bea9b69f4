"""scGPT: checkpoint folder round trip, strict loading, gene mapping, tokenisation, padding.

Every model here is randomly initialised (save_random_scgpt) and says so in its info.
"""

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from mihd_assets.embeddings.scgpt import (
    WEIGHTS_FILE,
    ScGPTError,
    bin_values,
    load_scgpt,
    pad_batch,
    save_random_scgpt,
    scgpt_embedding,
    tokenize_cells,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, slide):
    folder = tmp_path_factory.mktemp("scgpt")
    return save_random_scgpt(folder, slide.var_names, embsize=32, nheads=2, d_hid=64, nlayers=2)


def _rewrite_checkpoint(src, dst, edit):
    dst.mkdir()
    for name in ("vocab.json", "args.json"):
        (dst / name).write_text((src / name).read_text())
    state = torch.load(src / WEIGHTS_FILE, weights_only=True)
    torch.save(edit(dict(state)), dst / WEIGHTS_FILE)
    return dst


def test_round_trip_shape_finite_deterministic(slide, model_dir):
    a, info = scgpt_embedding(slide, model_dir, max_genes=50, batch_size=16)
    b, _ = scgpt_embedding(slide, model_dir, max_genes=50, batch_size=16)
    assert a.shape == (slide.n_obs, 32) and a.dtype == np.float32
    assert np.all(np.isfinite(a))
    np.testing.assert_array_equal(a, b)
    assert info["weights"] == "random" and len(info["weights_sha256"]) == 64
    assert info["n_genes_matched"] == slide.n_vars == info["n_genes_matched_by_symbol"]
    assert info["input_style"] == "binned" and info["n_bins"] == 51
    # Every gene is in the vocabulary: a cell is truncated when more than 50 of its counts are > 0.
    expressed = np.asarray((sp.csr_matrix(slide.layers["counts"]) > 0).sum(axis=1)).ravel()
    assert info["tokens_per_cell_max"] == 51 and info["n_cells_truncated"] == int((expressed > 50).sum())
    assert "raw" in info["normalization"]
    # Raw CLS outputs, not unit vectors (normalisation is the consumer's job).
    assert not np.allclose(np.linalg.norm(a, axis=1), 1.0)
    # Different cells get different embeddings.
    assert np.unique(a.round(5), axis=0).shape[0] > slide.n_obs // 2


def test_genes_mapped_by_id_when_symbols_miss(slide, tmp_path):
    folder = save_random_scgpt(tmp_path / "by_id", slide.var["gene_ids"], seed=1)
    emb, info = scgpt_embedding(slide, folder, max_genes=50)
    assert info["n_genes_matched"] == slide.n_vars
    assert info["n_genes_matched_by_symbol"] == 0 and info["n_genes_matched_by_id"] == slide.n_vars
    assert emb.shape == (slide.n_obs, 32)
    # Without the id column nothing matches, and that is an error naming the vocabulary.
    with pytest.raises(ScGPTError, match=r"none of the 120 genes is in .*vocab\.json"):
        scgpt_embedding(slide, folder, gene_id_column=None)


def test_partial_match_mixes_symbols_and_ids(slide, tmp_path):
    genes = [*slide.var_names[:60], *slide.var["gene_ids"][60:90]]
    folder = save_random_scgpt(tmp_path / "mixed", genes)
    _, info = scgpt_embedding(slide, folder, max_genes=50)
    assert (info["n_genes_matched_by_symbol"], info["n_genes_matched_by_id"], info["n_genes_matched"]) == (60, 30, 90)


def test_no_matching_genes_is_an_error(slide, tmp_path):
    folder = save_random_scgpt(tmp_path / "other", ["NOT_A_GENE_1", "NOT_A_GENE_2"])
    with pytest.raises(ScGPTError, match=r"none of the 120 genes .*symbols like \['RELN'.*ids like \['ENSGDEMO"):
        scgpt_embedding(slide, folder)


@pytest.mark.parametrize("value", [None, "", "  "])
def test_missing_model_dir_names_the_setting(slide, value):
    with pytest.raises(ScGPTError, match=r"ModelWeightsResource\.scgpt_dir.*MIHD_SCGPT_DIR"):
        scgpt_embedding(slide, value)


def test_incomplete_folder_names_the_missing_file(tmp_path, model_dir):
    folder = tmp_path / "partial"
    folder.mkdir()
    (folder / "vocab.json").write_text((model_dir / "vocab.json").read_text())
    with pytest.raises(ScGPTError, match=r"lacks \['args.json', 'best_model.pt'\]"):
        load_scgpt(folder)
    with pytest.raises(ScGPTError, match="does not exist"):
        load_scgpt(tmp_path / "nowhere")


def test_renamed_key_is_an_error_naming_file_and_key(tmp_path, model_dir):
    def rename(state):
        state["encoder.embeddings.weight"] = state.pop("encoder.embedding.weight")
        return state

    folder = _rewrite_checkpoint(model_dir, tmp_path / "renamed", rename)
    with pytest.raises(ScGPTError) as err:
        load_scgpt(folder)
    text = str(err.value)
    assert str(folder / "best_model.pt") in text
    assert "missing keys ['encoder.embedding.weight']" in text
    assert "unexpected keys ['encoder.embeddings.weight']" in text


def test_shape_mismatch_is_an_error(tmp_path, model_dir):
    def shrink(state):
        state["value_encoder.linear2.weight"] = state["value_encoder.linear2.weight"][:, :16]
        return state

    folder = _rewrite_checkpoint(model_dir, tmp_path / "shape", shrink)
    with pytest.raises(ScGPTError, match=r"value_encoder\.linear2\.weight \(32, 16\) != \(32, 32\)"):
        load_scgpt(folder)


def test_unused_heads_ignored_and_flash_keys_renamed(slide, tmp_path, model_dir):
    """A checkpoint laid out like scGPT's released ones loads to the same embeddings."""

    def as_released(state):
        out = {}
        for key, value in state.items():
            out[key.replace("self_attn.in_proj_", "self_attn.Wqkv.")] = value
        out["decoder.fc.0.weight"] = torch.zeros(32, 32)
        out["mvc_decoder.gene2query.weight"] = torch.zeros(32, 32)
        out["flag_encoder.weight"] = torch.zeros(2, 32)
        return out

    folder = _rewrite_checkpoint(model_dir, tmp_path / "released", as_released)
    model = load_scgpt(folder)
    assert model.renamed_keys == 4  # Wqkv weight + bias in each of 2 layers
    assert model.ignored_keys == {"decoder.": 1, "mvc_decoder.": 1, "flag_encoder.": 1}
    a, info = scgpt_embedding(slide, folder, max_genes=30)
    b, _ = scgpt_embedding(slide, model_dir, max_genes=30)
    np.testing.assert_array_equal(a, b)
    assert sorted(info["ignored_checkpoint_heads"]) == ["decoder.", "flag_encoder.", "mvc_decoder."]
    assert info["ignored_checkpoint_heads"]["decoder."].startswith("1 tensors, expression decoder")


def test_batch_norm_or_batch_label_weights_are_not_silently_dropped(tmp_path, model_dir):
    folder = _rewrite_checkpoint(model_dir, tmp_path / "dsbn", lambda s: {**s, "dsbn.bns.0.weight": torch.ones(32)})
    with pytest.raises(ScGPTError, match=r"unexpected keys \['dsbn\.bns\.0\.weight'\]"):
        load_scgpt(folder)


def test_padding_mask_keeps_a_cell_independent_of_its_batch(model_dir):
    model = load_scgpt(model_dir)
    net, pad, pad_value = model.network, model.pad_id, float(model.args["pad_value"])
    short = (np.array([model.cls_id, 3, 4, 5]), np.array([pad_value, 1, 2, 3], dtype=np.float32))
    long = (np.array([model.cls_id, *range(6, 26)]), np.linspace(1, 50, 21).astype(np.float32))
    long[1][0] = pad_value
    with torch.inference_mode():
        alone = net.cell_embedding(*pad_batch([short[0]], [short[1]], pad, pad_value))[0]
        tok, val, mask = pad_batch([short[0], long[0]], [short[1], long[1]], pad, pad_value)
        assert mask[0].sum() == 17 and not mask[1].any()
        batched = net.cell_embedding(tok, val, mask)[0]
        unmasked = net.cell_embedding(tok, val, torch.zeros_like(mask))[0]
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    # The mask is what makes this hold: attending to the padding changes the cell.
    assert (unmasked - alone).abs().max() > 1e-3


def test_batch_size_does_not_change_embeddings(slide, model_dir):
    a, _ = scgpt_embedding(slide, model_dir, max_genes=40, batch_size=1)
    b, _ = scgpt_embedding(slide, model_dir, max_genes=40, batch_size=64)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_cap_keeps_top_expressed_genes_binned_over_all(model_dir):
    """Over max_genes, a cell keeps its strongest genes; bins still rank all its expressed genes (as scGPT)."""
    model = load_scgpt(model_dir)
    genes = [g for g in model.vocab if not g.startswith("<")][:6]
    ids = np.array([model.vocab[g] for g in genes])
    counts = sp.csr_matrix(np.array([[9, 8, 7, 0, 0, 0], [1, 9, 1, 8, 1, 7]], dtype=np.float64))
    tokens, values, report = tokenize_cells(counts, ids, model, max_genes=3)
    assert report["n_cells_truncated"] == 1 and report["tokens_per_cell_max"] == 4
    assert tokens[0].tolist() == [model.cls_id, *ids[:3]]
    assert tokens[1].tolist() == [model.cls_id, ids[1], ids[3], ids[5]]  # the 9, 8 and 7, in gene order
    assert values[0][0] == values[1][0] == model.args["pad_value"]
    assert values[0].tolist()[1:] == [50, 25, 1]  # 51 bins over {7, 8, 9}
    assert values[1][3] > values[0][3]  # the 7 outranks the 1s of its own cell
    # Unmatched genes (id -1) are never tokens.
    tokens, _, _ = tokenize_cells(counts, np.array([-1, -1, -1, *ids[3:]]), model, max_genes=10)
    assert tokens[0].tolist() == [model.cls_id] and tokens[1].tolist() == [model.cls_id, *ids[3:]]


def test_negative_expression_rejected(slide, model_dir):
    with pytest.raises(ScGPTError, match=r"shape \(146, 120\) \(layer None\) has negative values"):
        scgpt_embedding(slide, model_dir, layer=None)  # X is the scaled, centred matrix


def test_bin_values_like_scgpt():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 100.0])
    bins = bin_values(values, n_bins=5)
    assert bins.min() == 1 and bins.max() == 4  # 1..n_bins-1; 0 means "not expressed"
    assert np.all(np.diff(bins) >= 0)  # rank preserving
    np.testing.assert_array_equal(bin_values(values * 7.5, 5), bins)  # depth invariant


def test_log1p_input_style(slide, tmp_path, model_dir):
    folder = tmp_path / "log1p"
    folder.mkdir()
    args = json.loads((model_dir / "args.json").read_text())
    (folder / "args.json").write_text(json.dumps({**args, "input_style": "log1p"}))
    for name in ("vocab.json", WEIGHTS_FILE):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    log1p, info = scgpt_embedding(slide, folder, max_genes=30)
    binned, _ = scgpt_embedding(slide, model_dir, max_genes=30)
    assert info["input_style"] == "log1p" and info["n_bins"] is None
    assert log1p.shape == binned.shape and not np.allclose(log1p, binned)


def test_forward_matches_scgpt_flash_layer_arithmetic(model_dir):
    """Recompute the <cls> output from a released-layout state dict by hand, as scGPT's
    flash layer does (packed Wqkv split as (three, heads, head_dim), post-norm), to pin the
    Wqkv -> in_proj_ rename and the encoder order."""
    import torch.nn.functional as F

    model = load_scgpt(model_dir)
    s = {k.replace("self_attn.in_proj_", "self_attn.Wqkv."): v for k, v in model.network.state_dict().items()}
    heads, d = int(model.args["nheads"]), int(model.args["embsize"])
    tokens = torch.tensor([[model.cls_id, 5, 9, 11, 12]])
    values = torch.tensor([[-2.0, 3.0, 50.0, 1.0, 600.0]])  # 600 exercises the clamp at 512

    def ln(x, name):
        return F.layer_norm(x, (d,), s[f"{name}.weight"], s[f"{name}.bias"])

    def lin(x, name):
        return F.linear(x, s[f"{name}.weight"], s[f"{name}.bias"])

    gene = ln(F.embedding(tokens, s["encoder.embedding.weight"]), "encoder.enc_norm")
    v = values.clamp(max=512).unsqueeze(-1)
    value = ln(lin(F.relu(lin(v, "value_encoder.linear1")), "value_encoder.linear2"), "value_encoder.norm")
    x = gene + value
    for i in range(int(model.args["nlayers"])):
        p = f"transformer_encoder.layers.{i}"
        qkv = lin(x, f"{p}.self_attn.Wqkv").view(1, x.shape[1], 3, heads, d // heads)
        q, k, vv = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        att = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1) @ vv
        x = ln(x + lin(att.transpose(1, 2).reshape(1, -1, d), f"{p}.self_attn.out_proj"), f"{p}.norm1")
        x = ln(x + lin(F.relu(lin(x, f"{p}.linear1")), f"{p}.linear2"), f"{p}.norm2")
    with torch.inference_mode():
        ours = model.network.cell_embedding(tokens, values, torch.zeros_like(tokens, dtype=torch.bool))
    torch.testing.assert_close(ours[0], x[0, 0], atol=1e-5, rtol=1e-5)
