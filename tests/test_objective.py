"""The denoising objective of the gradient attacks, per family: `Family.predict` is exactly the denoiser call the
family's pipeline makes, and the loss sends gradients to every conditioning row."""

from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline

from rece.attacks.objective import conditioning, denoising_loss, is_flow_matching, noisy_and_target
from rece.families import family_of_pipeline
from rece.models import load_model

from .family_checks import DIT_BUILDERS

BUILDERS = DIT_BUILDERS


@pytest.fixture(scope="module", params=["sd", "sdxl", *BUILDERS])
def target(request, tmp_path_factory):
    if request.param in BUILDERS:
        folder = BUILDERS[request.param](tmp_path_factory.mktemp("models") / request.param)
    else:
        folder = request.getfixturevalue(f"{request.param}_path")
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return SimpleNamespace(pipe=pipe, base=load_model(pipe))


def first_denoiser_call(pipe, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The latents the pipeline's denoiser reads at its first step, and what it returns (no guidance: one branch)."""
    family = family_of_pipeline(pipe)
    seen = []
    model = getattr(pipe, family.denoiser)

    def hook(module, args, kwargs, output):
        if not seen:
            latents = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
            seen.append((latents.detach().clone(), (output[0] if isinstance(output, tuple) else output.sample).detach()))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        pipe(prompt=[prompt], num_inference_steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
             output_type="latent", **family.call_kwargs)  # fmt: skip
    finally:
        handle.remove()
    return seen[0]


def test_predict_is_the_pipelines_denoiser_call(target):
    pipe = target.pipe
    noisy, expected = first_denoiser_call(pipe, "a red cat")
    rows, attended = conditioning(target, ["a red cat"])
    t = pipe.scheduler.timesteps[:1]
    with torch.no_grad():
        got = family_of_pipeline(pipe).predict(pipe, noisy, t, rows, attended, guidance=1.0)
    channels = noisy.shape[1]
    expected = expected[:, :channels] if expected.shape[1] == 2 * channels and expected.dim() == 4 else expected
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_loss_sends_gradients_to_every_row(target):
    pipe = target.pipe
    x0, _ = first_denoiser_call(pipe, "a blue dog")
    rows, attended = conditioning(target, ["a blue dog"])
    rows = [r.clone().requires_grad_(True) for r in rows]
    t = torch.tensor([500])
    loss = denoising_loss(pipe, x0, rows, attended, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), 3.5)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    for r in rows:  # the token rows (masked families: the attended ones) and every pooled vector
        assert r.grad[:, : attended[0]].abs().sum() > 0


def test_noising_follows_the_schedulers_objective(target):
    scheduler = target.pipe.scheduler
    x0, noise = torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)
    noisy, goal = noisy_and_target(scheduler, x0, noise, torch.tensor([0]))
    if is_flow_matching(scheduler):  # σ = 0: the clean latents, velocity ε − x0
        torch.testing.assert_close(noisy, x0)
        torch.testing.assert_close(goal, noise - x0)
    else:  # t = 0: ᾱ_0 close to 1, and the same after the sampler's own set_timesteps (a sampler's add_noise is not)
        alpha_bar = scheduler.alphas_cumprod[0]
        torch.testing.assert_close(noisy, x0 * alpha_bar.sqrt())
        scheduler.set_timesteps(2)
        torch.testing.assert_close(noisy_and_target(scheduler, x0, noise, torch.tensor([0]))[0], noisy)
