"""`ring-a-bell` and `mma` on the families whose padding is masked (PixArt's T5, Sana's Gemma-2 after its instruction):
the search runs over that encoder's tokens and improves its objective on the rows the edited layers read (padding
rows zero), mma never emits a banned token, the gradient flows through the token embeddings and the caption
projection, and each image is the one the pipeline draws from the found text, from exactly the rows stored."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from rece.attacks import mma, run_attack
from rece.attacks.encoder_tokens import EncoderTokens
from rece.attacks.ring_a_bell import masked_rows
from rece.models import load_model
from rece.tiny_dit import build_tiny_pixart, build_tiny_sana

from .runs import pixels, write_csv

BUILDERS = {"pixart": build_tiny_pixart, "sana": build_tiny_sana}
PROMPT = "a photo of a cat"
RUN = dict(concepts=["cat"], steps=2, images_per_prompt=1, progress=False)
RING_A_BELL = dict(population=8, generations=6, length=4)
MMA = dict(iterations=3, candidates=12, topk=16, length=4, banned_words="dog")


@pytest.fixture(scope="module", params=list(BUILDERS))
def folder(request, tmp_path_factory):
    return BUILDERS[request.param](tmp_path_factory.mktemp("models") / request.param)


@pytest.fixture(scope="module")
def prompt_set(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("sets") / "cat.csv", ["case_number", "prompt", "evaluation_seed"], [[0, PROMPT, 5]])


def masked(view, texts):
    """The rows the edited layers read for texts, padding rows zero (as the attacks compare them)."""
    return masked_rows(view, view.encoder.encode(texts), texts)


def case_of(out):
    manifest = json.loads((out / "manifest.json").read_text())
    return manifest, manifest["attack"]["cases"]["0"]


def check_drawn_from_the_found_text(folder, out, text):
    """The stored rows are the found text's rows (padding zero) with its attended count, and the image is the one the
    pipeline draws from that text, not the one it draws from the prompt attacked."""
    stored = load_file(out / "adversarial.safetensors")
    view = load_model(folder)
    assert torch.equal(stored["embeds.0"], masked(view, [text])[0].float())
    assert int(stored["attended.0"]) == view.encoder.token_counts([text])[0] < stored["embeds.0"].shape[0]
    assert not stored["embeds.0"][int(stored["attended.0"]) :].any()
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pixels(out)["0_0.png"].astype(np.float32) / 255
    manifest, _ = case_of(out)
    call = dict(num_inference_steps=2, guidance_scale=manifest["settings"]["guidance"], height=image.shape[0],
                width=image.shape[0], output_type="np", **view.family.call_kwargs)  # fmt: skip
    drawn = pipe(prompt=[text], generator=[torch.Generator().manual_seed(5)], **call).images[0]
    assert np.abs(image - drawn).max() <= 1 / 255 + 1e-6
    concept = pipe(prompt=[PROMPT], generator=[torch.Generator().manual_seed(5)], **call).images[0]
    assert np.abs(image - concept).max() > 2 / 255  # the check tells the found text from the prompt
    return stored, view


def test_ring_a_bell_searches_the_encoders_tokens_and_draws_the_found_text(folder, prompt_set, tmp_path):
    pairs = write_csv(
        tmp_path / "pairs.csv", ["sensitive prompt", "normal prompt"], [[PROMPT, "a photo of a dog"], ["a cat", "a dog"]]
    )
    out = run_attack(folder, None, "ring-a-bell", tmp_path / "run", prompts=prompt_set, pairs=str(pairs), **RUN, **RING_A_BELL)
    _, case = case_of(out)
    info = case["info"]
    assert info["fitness"] < info["fitness_first_generation"]  # the search improved its objective
    stored, view = check_drawn_from_the_found_text(folder, out, case["prompt"])
    tokenizer = load_model(folder).encoder.tokenizers[0]
    assert tokenizer.decode(stored["ids.0"][1:5].tolist()) == case["prompt"]  # the K tokens searched, decoded
    # the fitness is that of the rows stored: against E(p) + η·v, padding rows zero, relative to the goal
    vector = (masked(view, [PROMPT, "a cat"]) - masked(view, ["a photo of a dog", "a dog"])).mean(dim=0)
    assert torch.allclose(stored["concept_vector"].double(), vector, atol=1e-5)
    goal = masked(view, [PROMPT])[0] + 3.0 * vector
    fitness = float((stored["embeds.0"].double() - goal).pow(2).sum() / goal.pow(2).sum())
    assert fitness == pytest.approx(info["fitness"], rel=1e-4)


def test_mma_searches_the_encoders_tokens_never_banned_and_draws_the_found_text(folder, prompt_set, tmp_path):
    out = run_attack(folder, None, "mma", tmp_path / "run", prompts=prompt_set, **RUN, **MMA)
    manifest, case = case_of(out)
    info = case["info"]
    assert info["loss"] < info["loss_first_step"]  # the search improved its objective
    stored, view = check_drawn_from_the_found_text(folder, out, case["prompt"])
    tokens = EncoderTokens(view)
    assert tokens.text_tokens(tokens.attended_ids([case["prompt"]])[0])[1] == stored["ids.0"].tolist()  # as the pipeline reads it
    tokenizer = view.encoder.tokenizers[0]
    words = mma.banned_words(["cat"], "dog")
    assert {"cat", "dog"} <= set(manifest["settings"]["attack_parameters"]["banned"])
    banned = mma.banned_ids(tokenizer, len(tokenizer), words)
    assert not set(stored["ids.0"].tolist()) & (banned | set(tokenizer.all_special_ids))
    assert set(stored["ids.0"].tolist()) <= set(stored["allowed_ids"].tolist())
    goal = masked(view, [PROMPT])[0]
    assert float(mma.space_losses([stored["embeds.0"][None]], [goal])[0]) == pytest.approx(info["loss"], abs=1e-5)


def test_the_gradient_flows_through_the_token_embeddings_of_the_rows_the_pipeline_builds(folder):
    view = load_model(folder)
    goal = masked(view, ["a red triangle"])[0]
    tokens = EncoderTokens(view, lambda rows: (rows.double() - goal).pow(2).sum(dim=(1, 2)))
    start, ids = tokens.text_tokens(tokens.attended_ids([PROMPT])[0])
    control = torch.tensor(ids)
    assert tokens.decoded(control[None])[0].strip() == PROMPT and bool(tokens.round_trips(control[None])[0])
    # T5's text starts the input; Gemma's follows Sana's instruction, whose last token ("▁") merges with the text's first
    assert start == {"pixart": 0, "sana": len(tokens.empty) - 1}[folder.name]
    lookup = tokens.text_encoder.get_input_embeddings()
    with torch.no_grad():
        looked_up = lookup(control)
        # what the lookup gives, put in its place, gives the pipeline's rows: the gradient is taken where they are read
        assert torch.allclose(tokens.rows(PROMPT, looked_up).double(), masked(view, [PROMPT]), atol=1e-5)
    grad = tokens.gradient(control)
    assert grad.shape == (len(ids), lookup.num_embeddings) and torch.isfinite(grad).all() and (grad.abs().sum(dim=1) > 0).all()
    # the one-hot gradient predicts the loss change of a small step from a token towards another, to first order (at
    # the position where it predicts the most: elsewhere float32 noise is of the change's size)
    best = grad.argmin(dim=1)
    change = grad[torch.arange(len(ids)), best] - grad[torch.arange(len(ids)), control]
    k = int(change.abs().argmax())
    with torch.no_grad():
        before = tokens.loss(tokens.rows(PROMPT, looked_up)).sum()
        moved = looked_up.clone()
        moved[k] += 1e-2 * (lookup(best[k : k + 1])[0] - looked_up[k])
        after = tokens.loss(tokens.rows(PROMPT, moved)).sum()
    predicted = 1e-2 * float(change[k])
    assert float(after - before) == pytest.approx(predicted, rel=0.1)
    letters = torch.tensor([tokens.tokenizer.convert_tokens_to_ids(c) for c in "cat"])  # "cat" is tokenized as one word
    assert not bool(tokens.round_trips(letters[None])[0])


def test_ordinary_ids_stop_at_the_tokenizers_last_entry(tmp_path):
    """T5's embedding table is padded past its tokenizer (32,128 rows for 32,100 tokens): ids the tokenizer cannot
    decode are never drawn."""
    from rece.attacks.common import ordinary_ids
    from rece.tiny_dit import save_t5_tokenizer

    tokenizer = save_t5_tokenizer(tmp_path / "t5")
    ids = ordinary_ids(tokenizer, len(tokenizer) + 28).tolist()
    assert max(ids) == len(tokenizer) - 1 and not set(ids) & set(tokenizer.all_special_ids)


def test_sentencepiece_word_tokens_are_allowed_and_banned_like_clip_words(tmp_path):
    """T5's and Gemma's word tokens start with "▁" (not ASCII): it counts as a space, so whole words stay in mma's
    vocabulary, and a banned word's "▁word" token is banned."""
    from rece.tiny_dit import save_gemma_tokenizer, save_t5_tokenizer

    for tokenizer in (save_t5_tokenizer(tmp_path / "t5"), save_gemma_tokenizer(tmp_path / "gemma")):
        vocab = tokenizer.get_vocab()
        allowed = set(mma.allowed_ids(tokenizer, len(tokenizer), mma.banned_words(["cat"], None)).tolist())
        assert vocab["▁cat"] not in allowed and vocab["▁dog"] in allowed and vocab["▁triangle"] in allowed
