"""CLIP's text encoder in plain torch (`rece.clip_text`) and the tokenizer cache (`rece.tokenizer_cache`) give what
transformers gives, bit for bit: erasing without importing transformers changes no number."""

import json
import shutil

import pytest
import torch
import transformers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import rece.tokenizer_cache as tokenizer_cache
from rece.clip_text import CONFIG_DEFAULTS, ClipText, load_clip_text
from rece.families import SD, SDXL
from rece.models import load_model
from rece.text import PromptEncoder
from rece.text_encoders import load_text_encoder, mapped_text_encoder
from rece.tokenizer_cache import CachedTokenizer, load_tokenizer
from rece.weights import safetensors_files

SMALL = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
         "bos_token_id": 997, "eos_token_id": 998, "pad_token_id": 999}  # fmt: skip
# (class, config, stored dtype): SD1's text encoder at full size; the widths (and activation) of SD2's ViT-H and of
# SDXL's bigG with a projection, with fewer layers; small ones in float32, with SD2's gelu, and with the EOS id 2 of
# configs from before transformers fixed it (pooled from the largest id)
CONFIGS = {
    "sd1-full": (CLIPTextModel, {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12}, torch.float16),
    "sd2-width": (
        CLIPTextModel,
        {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 3, "hidden_act": "gelu"},
        torch.float16,
    ),
    "sdxl-bigG-width": (
        CLIPTextModelWithProjection,
        {
            "hidden_size": 1280,
            "intermediate_size": 5120,
            "num_attention_heads": 20,
            "num_hidden_layers": 3,
            "hidden_act": "gelu",
            "projection_dim": 1280,
        },
        torch.float16,
    ),  # fmt: skip
    "small": (CLIPTextModel, SMALL, torch.float32),
    "small-gelu-projection": (CLIPTextModelWithProjection, {**SMALL, "hidden_act": "gelu", "projection_dim": 24}, torch.float32),
    "small-legacy-eos": (CLIPTextModel, {**SMALL, "eos_token_id": 2}, torch.float32),
}


def save_encoder(folder, cls, config: dict, dtype) -> None:
    torch.manual_seed(0)
    model = cls(CLIPTextConfig(**config))
    model.to(dtype).save_pretrained(folder)


def token_ids(config, n: int = 4, length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids like a tokenizer's (BOS, words, EOS, then padding) and their attention mask; one row fills the context."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, min(config.vocab_size, 1000), (n, length), generator=gen)
    ends = [3, 17, length - 1, 40][:n]
    mask = torch.zeros(n, length, dtype=torch.long)
    for row, end in enumerate(ends):
        ids[row, 0], ids[row, end], mask[row, : end + 1] = config.bos_token_id, config.eos_token_id, 1
        ids[row, end + 1 :] = config.eos_token_id if row % 2 else config.pad_token_id
    return ids, mask


def assert_same_outputs(ours, theirs, projection: bool) -> None:
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
    assert len(ours.hidden_states) == len(theirs.hidden_states)
    assert all(torch.equal(a, b) for a, b in zip(ours.hidden_states, theirs.hidden_states))
    if projection:
        assert torch.equal(ours.text_embeds, theirs.text_embeds)
    else:
        assert torch.equal(ours.pooler_output, theirs.pooler_output)


def test_config_defaults_are_transformers_own():
    config = CLIPTextConfig()
    assert {k: getattr(config, k) for k in CONFIG_DEFAULTS} == CONFIG_DEFAULTS


@pytest.mark.parametrize("name", list(CONFIGS))
def test_clip_text_equals_transformers_bit_for_bit(tmp_path, name):
    cls, config, dtype = CONFIGS[name]
    save_encoder(tmp_path, cls, config, dtype)
    theirs = mapped_text_encoder(tmp_path, cls, None).eval()  # what rece computed with before (float32 on the file)
    ours = load_clip_text(tmp_path, cls.__name__, safetensors_files(tmp_path, "model"))
    assert isinstance(ours, ClipText)
    ids, mask = token_ids(theirs.config)
    with torch.no_grad():
        for attention in (None, mask, torch.ones_like(mask)):  # no mask, padding masked (SD2-style configs), all ones
            kwargs = {} if attention is None else {"attention_mask": attention}
            assert_same_outputs(ours(ids, output_hidden_states=True, **kwargs), theirs(ids, output_hidden_states=True, **kwargs),
                                cls is CLIPTextModelWithProjection)  # fmt: skip
        if dtype == torch.float32:  # from_pretrained's float32 model too (the mapped one is checked against it elsewhere)
            full = cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
            assert torch.equal(ours(ids)[0], full(ids)[0])


def test_folders_clip_text_does_not_reproduce_go_to_transformers(tmp_path):
    save_encoder(tmp_path / "a", CLIPTextModel, {**SMALL, "hidden_act": "gelu_new"}, torch.float32)
    save_encoder(tmp_path / "b", CLIPTextModel, SMALL, torch.float32)
    config = json.loads((tmp_path / "b" / "config.json").read_text())
    (tmp_path / "b" / "config.json").write_text(json.dumps({**config, "output_hidden_states": True}))
    for sub in ("a", "b"):
        assert load_clip_text(tmp_path / sub, "CLIPTextModel", safetensors_files(tmp_path / sub, "model")) is None
        encoder = load_text_encoder(tmp_path, sub, "CLIPTextModel", ("CLIPTextModel",), "cpu")
        assert isinstance(encoder, CLIPTextModel)
    assert load_clip_text(tmp_path / "b", "CLIPTextModelWithProjection", safetensors_files(tmp_path / "b", "model")) is None


TEXTS = [
    "",
    " ",
    "a cat",
    "A CAT!",
    "cat!dog",
    "hello! world <|endoftext|> x",
    "<|startoftext|>cat",
    "naïve café 東京 🙂",
    "it's don't we'll",
    "a  b\t\nc",
    "12345 6.7",
    "!!!",
    "x" * 300,
    " ".join(["a photo of a cat"] * 30),
]


def legacy_tokenizer(source, folder, pad: str):
    """A tokenizer folder as transformers 4 wrote SD1/SD2's: vocab and merges, AddedToken dicts, no tokenizer.json."""
    folder.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(source / name, folder / name)
    token = {"__type": "AddedToken", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    specials = {
        "bos_token": {**token, "content": "<|startoftext|>"},
        "eos_token": {**token, "content": "<|endoftext|>"},
        "unk_token": {**token, "content": "<|endoftext|>"},
        "pad_token": pad,
    }
    config = {**specials, "add_prefix_space": False, "do_lower_case": True, "errors": "replace", "model_max_length": 77,
              "tokenizer_class": "CLIPTokenizer"}  # fmt: skip
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder


def assert_same_tokens(ours, theirs) -> None:
    for length in (77, 12):
        a = theirs(TEXTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        b = ours(TEXTS, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
    for text in TEXTS:
        assert ours(text).input_ids == theirs(text).input_ids
    assert ours.model_max_length == theirs.model_max_length


def test_cached_tokenizers_equal_transformers(sd_path, sdxl_path, tmp_path, monkeypatch):
    folders = [sd_path / "tokenizer", sdxl_path / "tokenizer_2"]  # SDXL's second pads with "!" (a special token)
    folders += [legacy_tokenizer(sd_path / "tokenizer", tmp_path / p, pad) for p, pad in (("v1", "<|endoftext|>"), ("v2", "!"))]
    for folder in folders:
        first = load_tokenizer(folder, "CLIPTokenizer")  # built with transformers and cached
        assert isinstance(first, CachedTokenizer)
        assert_same_tokens(first, CLIPTokenizer.from_pretrained(folder))
    monkeypatch.setattr(tokenizer_cache, "transformers_tokenizer", lambda *a: pytest.fail("read with transformers"))
    for folder in folders:
        assert_same_tokens(load_tokenizer(folder, "CLIPTokenizer"), CLIPTokenizer.from_pretrained(folder))


def test_tokenizer_cache_follows_the_folder_and_survives_damage(sd_path, tmp_path, monkeypatch):
    monkeypatch.setenv("RECE_CACHE", str(tmp_path / "cache"))
    folder = shutil.copytree(sd_path / "tokenizer", tmp_path / "tok")
    load_tokenizer(folder, "CLIPTokenizer")
    (entry,) = (tmp_path / "cache" / "tokenizers").iterdir()
    entry.write_text("{not json")  # damaged: rebuilt
    assert_same_tokens(load_tokenizer(folder, "CLIPTokenizer"), CLIPTokenizer.from_pretrained(folder))
    assert json.loads(entry.read_text())["model_max_length"] == 77
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 20}))
    changed = load_tokenizer(folder, "CLIPTokenizer")  # a changed folder is a new entry, never the old one
    assert changed.model_max_length == 20 and len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_load_model_encodes_as_transformers_does(request, family):
    """A folder's prompt encoder (ClipText, CachedTokenizer) gives the rows the transformers objects give."""
    folder = request.getfixturevalue(f"{family}_path")
    fam = {"sd": SD, "sdxl": SDXL}[family]
    base = load_model(folder)
    assert all(isinstance(e, ClipText) for e in base.encoder.text_encoders)
    assert all(isinstance(t, CachedTokenizer) for t in base.encoder.tokenizers)
    index = json.loads((folder / "model_index.json").read_text())
    tokenizers = [CLIPTokenizer.from_pretrained(folder / tok) for tok, _ in fam.text_parts]
    encoders = [mapped_text_encoder(folder / enc, getattr(transformers, index[enc][1]), None).eval() for _, enc in fam.text_parts]
    reference = PromptEncoder(fam, tokenizers, encoders, device="cpu")
    texts = ["", "nudity", "a photo of a cat!", "x " * 100]
    assert torch.equal(base.encoder.encode(texts), reference.encode(texts))
