"""Reading the files ComfyUI, A1111 and Forge users have, without diffusers and without --config: all-in-one
checkpoints, split denoiser + text encoder files, float8; each family's published encoders as recorded."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

from rece import checkpoint as ck
from rece.cli import main
from rece.edit import load_edit
from rece.families import FLUX, FLUX_SCHNELL, SD, SD3, SDXL
from rece.families.base import MAX_SEQUENCE_LENGTH
from rece.families.encoders import CLIP_G, CLIP_H, CLIP_L, T5XXL
from rece.models import load_model

from . import comfy_files as cf

TEXTS = ["cat", "a photo of a dog", ""]


def cache_repo(monkeypatch, cache, repo: str, tokenizers) -> None:
    """Put a hub repository's tokenizer folders in a hub cache, as a download would have, and use that cache."""
    import huggingface_hub.constants

    folder = cache / f"models--{repo.replace('/', '--')}"
    commit = "0" * 40
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    shutil.copytree(tokenizers, folder / "snapshots" / commit, dirs_exist_ok=True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def reference_rows(family, built, texts=TEXTS) -> list[torch.Tensor]:
    """Each space's rows as the family computes them with transformers' tokenizers and the encoders written."""
    import transformers

    parts = [i for i, (tok, _) in enumerate(family.text_parts) if (built.tokenizers / tok).is_dir()]
    tokenizers = [
        getattr(transformers, family.tokenizer_class_of(i)).from_pretrained(built.tokenizers / family.text_parts[i][0])
        for i in parts
    ]
    with torch.no_grad():
        if family.spaces:
            return [s.encode_batch(tokenizers, built.encoders, texts, "cpu") for s in family.spaces]
        return [family.encode_batch(tokenizers, built.encoders, texts, "cpu")]


def assert_reads(base, family, built, kv_dtype=None):
    """The model read from the file: its family, the edited weights exactly as stored, and rows equal to the reference's."""
    assert base.family.name == family.name
    stored = load_file(built.path)
    assert set(base.kv) == set(built.edited)
    for name, key in built.edited.items():
        assert torch.equal(base.kv[name], stored[key].float()), name
    for view, rows in zip(base.views, reference_rows(family, built)):
        got = view.encoder.encode(TEXTS)
        assert got.shape == rows.shape and torch.equal(got.float(), rows.float()), view.family.name


CASES = {
    "sd15": (cf.sd1, SD),
    "sd15-ema": (lambda root: cf.sd1(root, ema=True), SD),
    "sd21-v": (cf.sd2, SD),
    "sdxl-base": (cf.sdxl, SDXL),
    "sdxl-refiner": (lambda root: cf.sdxl(root, refiner=True), SDXL),
    "flux-fp8-all-in-one": (cf.flux_all_in_one, FLUX),
    "sd35-all-in-one": (cf.sd35, SD3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_all_in_one_files_read_with_tokenizers_only(case, tmp_path, capsys):
    """--config DIR holding only tokenizer folders: everything else comes from the checkpoint; `rece erase` and
    `rece apply` from the command line, the written file byte for byte the input's but the edited tensors."""
    build, family = CASES[case]
    built = build(tmp_path)
    assert all(p.name.startswith("tokenizer") for p in built.tokenizers.iterdir())
    assert_reads(load_model(built.path, config=str(built.tokenizers)), family, built)
    edit, out = tmp_path / "edit.safetensors", tmp_path / "erased.safetensors"
    argv = ["erase", str(built.path), "-c", "cat", "--preset", "nudity", "--config", str(built.tokenizers), "-o", str(edit)]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(["apply", str(built.path), str(edit), "-o", str(out)]) == 0, capsys.readouterr().err
    before, after = ck.read_header(built.path), ck.read_header(out)
    assert [(k, v) for k, v in before[0].items() if k != "__metadata__"] == [
        (k, v) for k, v in after[0].items() if k != "__metadata__"
    ]
    data = [f.read_bytes()[start:] for f, start in ((built.path, before[1]), (out, after[1]))]
    edited = sorted(tuple(before[0][k]["data_offsets"]) for k in built.edited.values())
    untouched, position = [], 0
    for begin, end in edited:
        untouched.append((position, begin))
        position = end
    untouched.append((position, len(data[0])))
    assert len(data[0]) == len(data[1]) and all(data[0][a:b] == data[1][a:b] for a, b in untouched)
    assert all(data[0][a:b] != data[1][a:b] for a, b in edited)


def test_split_flux_files_are_recognised_by_their_contents(tmp_path):
    built = cf.flux_split(tmp_path)
    files = [str(built.split["t5xxl"]), str(built.split["clip_l"])]  # any order
    assert_reads(load_model(built.path, config=str(built.tokenizers), text_encoders=files), FLUX, built)
    # a T5 file whose token table is stored once, as encoder.embed_tokens (transformers ties it to shared)
    t5 = load_file(built.split["t5xxl"])
    t5["encoder.embed_tokens.weight"] = t5.pop("shared.weight")
    files[0] = str(cf.save(t5, tmp_path / "t5xxl_embed_tokens.safetensors"))
    assert_reads(load_model(built.path, config=str(built.tokenizers), text_encoders=files), FLUX, built)
    schnell = cf.flux_split(tmp_path / "schnell", dev=False)  # no guidance_in: FLUX.1 [schnell]
    base = load_model(schnell.path, config=str(schnell.tokenizers), text_encoders=list(map(str, schnell.split.values())))
    assert base.family is FLUX_SCHNELL


def test_sd3_without_t5_reads_zero_t5_rows_and_a_split_t5_fills_them(tmp_path):
    built = cf.sd35(tmp_path, t5_inside=False)
    with_t5 = load_model(built.path, config=str(built.tokenizers), text_encoders=[str(built.split["t5xxl"])])
    assert_reads(with_t5, SD3, built)
    without = load_model(built.path, config=str(built.tokenizers))
    rows = without.views[0].encoder.encode(["cat"])
    assert rows.shape[1] == 77 + 256 and not rows[:, 77:].any()


def test_erase_without_config_reads_the_cached_reference_tokenizers_and_apply_changes_only_the_edited(
    tmp_path, monkeypatch, capsys
):
    """`rece erase CKPT` offline with the family's reference repository's tokenizers in the hub cache; `apply` is
    byte-identical but the edited tensors; the model_ema copy stays as it was."""
    built = cf.sd1(tmp_path, ema=True)
    cache_repo(monkeypatch, tmp_path / "hub", SD.tokenizer_repo(["clip_l"]), built.tokenizers)
    edit = tmp_path / "edit.safetensors"
    assert main(["erase", str(built.path), "-c", "cat", "-o", str(edit)]) == 0, capsys.readouterr().err
    out = tmp_path / "erased.safetensors"
    assert main(["apply", str(built.path), str(edit), "-o", str(out)]) == 0, capsys.readouterr().err
    before, after = load_file(built.path), load_file(out)
    entries = [[k for k in ck.read_header(f)[0] if k != "__metadata__"] for f in (built.path, out)]
    assert entries[0] == entries[1] and any(k.startswith("model_ema.") for k in entries[0])
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(built.edited.values())
    expected = load_edit(edit).edited_kv({n: before[k].float() for n, k in built.edited.items()})
    for name, key in built.edited.items():
        assert torch.equal(after[key], expected[name].to(torch.float16)), name


def test_offline_without_cached_tokenizers_is_one_line_naming_the_option(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    built = cf.sdxl(tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    assert main(["erase", str(built.path), "-c", "cat", "-o", str(tmp_path / "e.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "tokenizer/, tokenizer_2/ of stabilityai/stable-diffusion-xl-base-1.0" in err
    assert "--config DIR" in err and not (tmp_path / "e.safetensors").exists()


def test_the_recorded_reference_repositories_are_diffusers_own():
    """Each family's tokenizer source is the repository diffusers' single-file loader takes that model's configs from."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS as paths

    def repo(name):
        return paths[name]["pretrained_model_name_or_path"]

    assert SD.tokenizer_repo(["clip_l"]) == repo("v1") and SD.tokenizer_repo(["clip_h"]) == repo("v2")
    assert SDXL.tokenizer_repo(["clip_l", "clip_g"]) == repo("xl_base") and SDXL.tokenizer_repo(["clip_g"]) == repo("xl_refiner")
    assert FLUX.tokenizer_repo(["clip_l", "t5xxl"]) == repo("flux-schnell")
    assert SD3.tokenizer_repo(["clip_l", "clip_g", "t5xxl"]) == repo("sd35_large")


def test_the_recorded_encoders_match_the_pipelines_reading_of_them(sd_path, sdxl_path):
    """Published widths: the edited layers' widths of each family are the sums its pipeline reads (SD1 768, SD2 1024,
    SDXL 768 + 1280, FLUX's pooled 768 and T5 4096, SD3's pooled 768 + 1280); the context and the layer SD2 leaves out
    as diffusers' configs say (77 CLIP positions, SD2's text encoder 23 of OpenCLIP-H's 24 layers)."""
    from diffusers.loaders.single_file_utils import SD_2_TEXT_ENCODER_KEYS_TO_IGNORE

    assert (CLIP_L.width, CLIP_H.width, CLIP_G.width, T5XXL.width) == (768, 1024, 1280, 4096)
    dropped = {k.split(".")[4] for k in SD_2_TEXT_ENCODER_KEYS_TO_IGNORE if ".resblocks." in k}
    assert dropped == {str(CLIP_H.layers - 1)} and CLIP_H.dropped_layers == 1
    assert CLIP_L.context == CLIP_G.context == 77 and T5XXL.context == MAX_SEQUENCE_LENGTH
    assert [CLIP_L.width // CLIP_L.head_width, CLIP_G.width // CLIP_G.head_width, T5XXL.width // T5XXL.head_width] == [12, 20, 64]
    assert SDXL.file_encoders == (("clip_l",), ("clip_g",)) and SDXL.projected_parts == (1,)
    assert SD3.projected_parts == (0, 1) and FLUX.projected_parts == () and SD3.optional_encoders == (2,)


BAD = {
    "another family's encoder": "is not a text encoder of FLUX.1, which reads CLIP-L (clip_l.safetensors) and T5-XXL",
    "missing encoder": "has no T5-XXL (t5xxl_fp16.safetensors) text encoder, which FLUX.1 needs; pass the file with",
    "same encoder twice": "two CLIP-L text encoders",
    "truncated": "is truncated",
    "scaled fp8": "is a scaled fp8 file",
    "wrong width": "text embeddings are 64-wide but the edited layers read 128: the text encoders (CLIP-L",
}


@pytest.mark.parametrize("problem", list(BAD))
def test_bad_files_are_one_line_and_nothing_is_written(problem, tmp_path, capsys):
    built = cf.flux_split(tmp_path)
    encoders = [str(built.split["clip_l"]), str(built.split["t5xxl"])]
    model = built.path
    if problem == "another family's encoder":
        # SD3's / SDXL's clip_g.safetensors: as deep as the published CLIP-G (32 layers), which tells it apart
        (tok,) = cf.clip_tokenizers(tmp_path / "gtok", {"tokenizer": "!"})
        deep = cf.clip(tok, 64, 32, seed=5, projection=64, act="gelu")
        encoders.append(str(cf.save(cf.state(deep), tmp_path / "clip_g.safetensors", torch.float16)))
    elif problem == "missing encoder":
        encoders = encoders[:1]
    elif problem == "same encoder twice":
        encoders.append(encoders[0])
    elif problem == "truncated":
        data = built.split["t5xxl"].read_bytes()
        encoders[1] = str(tmp_path / "t5_cut.safetensors")
        (tmp_path / "t5_cut.safetensors").write_bytes(data[: len(data) // 2])
    elif problem == "scaled fp8":
        tensors = load_file(built.path) | {"txt_in.scale_weight": torch.ones(1)}
        model = cf.save(tensors, tmp_path / "flux1-dev-fp8-scaled.safetensors")
    elif problem == "wrong width":
        wide = cf.t5(cf.save_t5_tokenizer(tmp_path / "t5tok"), 64, seed=3)
        encoders[1] = str(cf.save(cf.state(wide), tmp_path / "t5_small.safetensors"))
    out = tmp_path / "edit.safetensors"
    argv = ["erase", str(model), "-c", "cat", "--config", str(built.tokenizers), "-o", str(out)]
    assert main(argv + [a for e in encoders for a in ("--text-encoder", e)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and BAD[problem] in err, err
    assert not out.exists()


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (float8 tensors compare bit for bit)."""
    return tensor.contiguous().view(torch.uint8) if tensor.element_size() == 1 else tensor


@pytest.fixture(scope="module")
def flux_fp8(tmp_path_factory):
    """ComfyUI's FLUX fp8 all-in-one and an edit erased from it (tokenizers from --config)."""
    root = tmp_path_factory.mktemp("flux-fp8")
    built = cf.flux_all_in_one(root)
    edit = root / "edit.safetensors"
    code = main(["erase", str(built.path), "-c", "cat", "--preset", "nudity", "--config", str(built.tokenizers), "-o", str(edit)])
    assert code == 0
    return built, edit


def test_float8_apply_writes_back_in_float8_and_reports_the_rounding(flux_fp8, tmp_path, capsys):
    """The edited K/V go back as F8_E4M3, every other byte as it was; the rounding the cast adds to the edit, relative
    to the edit's change, is printed, with the LoRA route when it is over 10 %."""
    built, edit = flux_fp8
    out = tmp_path / "erased.safetensors"
    capsys.readouterr()
    assert main(["apply", str(built.path), str(edit), "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    before, after = load_file(built.path), load_file(out)
    changed = {k for k in before if not torch.equal(raw(before[k]), raw(after[k]))}
    assert changed == set(built.edited.values())
    exact = load_edit(edit).edited_kv({n: before[k].float() for n, k in built.edited.items()})
    shares = {}
    for name, key in built.edited.items():
        assert after[key].dtype == torch.float8_e4m3fn
        assert torch.equal(raw(after[key]), raw(exact[name].to(torch.float8_e4m3fn)))
        change = (exact[name].double() - before[key].double()).norm()
        shares[name] = ((exact[name].to(torch.float8_e4m3fn).double() - exact[name].double()).norm() / change).item()
    worst = max(shares, key=shares.get)
    assert (
        f"float8: written back as F8_E4M3, the cast adds {shares[worst]:.1%} of the edit's own change (worst layer: {worst})"
        in printed
    )
    assert ("--format diff" in printed) == (shares[worst] > 0.10)


def test_float8_e5m2_reads_upcast(tmp_path):
    built = cf.flux_all_in_one(tmp_path, dtype=torch.float8_e5m2)
    base = load_model(built.path, config=str(built.tokenizers))
    assert ck.read_header(built.path)[0][built.edited["context_embedder"]]["dtype"] == "F8_E5M2"
    assert_reads(base, FLUX, built)


@pytest.mark.parametrize("fmt", ["kohya", "diff"])
def test_lora_from_an_all_in_one_file_gives_the_exact_edit_by_comfyuis_rule(flux_fp8, fmt, tmp_path, capsys):
    """`rece lora CKPT EDIT` from the fp8 file: read as ComfyUI reads a kohya / .diff file against that checkpoint
    (`lora_unet_` + the key past diffusion_model., dots as underscores), it adds the edit's exact change."""
    from .test_checkpoint_mmdit import comfy_key_map

    built, edit = flux_fp8
    lora = tmp_path / f"{fmt}.safetensors"
    argv = ["lora", str(built.path), str(edit), "--format", fmt, "--tolerance", "1e-6"]  # no tokenizers needed
    assert main([*argv, "-o", str(lora)]) == 0, capsys.readouterr().err
    original, state = load_file(built.path), load_file(lora)
    keys = comfy_key_map(original)
    exact = load_edit(edit).edited_kv({n: original[k].float() for n, k in built.edited.items()})
    modules = {k.split(".")[0] for k in state}
    assert {keys[m] for m in modules} == set(built.edited.values())
    for module in modules:
        if f"{module}.diff" in state:
            delta = state[f"{module}.diff"].double()
        else:
            down, up = state[f"{module}.lora_down.weight"].double(), state[f"{module}.lora_up.weight"].double()
            delta = state[f"{module}.alpha"].item() / down.shape[0] * up @ down
        name = next(n for n, k in built.edited.items() if k == keys[module])
        want = exact[name].double()
        assert ((original[keys[module]].double() + delta - want).norm() / want.norm()).item() <= 1e-5, module


def test_sd35_medium_split_files_read_as_comfyui_keeps_them(tmp_path, capsys):
    """The MMDiT-X file alone (dual attention, qk norms) with clip_l, clip_g and t5xxl given in any order: the two CLIPs
    told apart by their contents, and erase / apply from the command line change only the edited tensors."""
    built = cf.sd35_medium_split(tmp_path)
    files = [str(built.split[k]) for k in ("t5xxl", "clip_g", "clip_l")]
    assert_reads(load_model(built.path, config=str(built.tokenizers), text_encoders=files), SD3, built)
    edit, out = tmp_path / "edit.safetensors", tmp_path / "erased.safetensors"
    argv = ["erase", str(built.path), "-c", "cat", "--config", str(built.tokenizers), "-o", str(edit)]
    assert main(argv + [a for f in files for a in ("--text-encoder", f)]) == 0, capsys.readouterr().err
    assert main(["apply", str(built.path), str(edit), "-o", str(out)]) == 0, capsys.readouterr().err
    before, after = load_file(built.path), load_file(out)
    assert list(before) == list(after)
    assert {k for k in before if not torch.equal(before[k], after[k])} == set(built.edited.values())
