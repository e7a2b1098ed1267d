"""ConformPipeline end to end on the tiny offline Stable Diffusion (random weights), its agreement with a
transcription of the official loop (materialising processor, one prompt at a time, every discarded forward
included), the automatic token grouping on a table of prompts, the overlays, and the CLI's errors."""
import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from contrastgen.methods import conform as C  # noqa: E402
from contrastgen.methods.attention_capture import MaterializingCapture  # noqa: E402
from contrastgen.methods.conform_demo import byte_level_tokenizer, tiny_stable_diffusion, word_tokenizer  # noqa: E402
from contrastgen.reference import attention_nce_ref  # noqa: E402

WORDS = ["a", "an", "and", "the", "with", "on", "of", "next", "to", "green", "glasses", "yellow", "clock", "two",
         "red", "apples", "wooden", "table", "cat", "frog", "black", "sitting", "brown", "dog", "chasing", "ball",
         "painting", "blue", "big", "wearing", "hat", "three", "birds", "square", "circle"]

GROUPING = [
    ("a green glasses and a yellow clock", [[2, 3], [6, 7]]),
    ("a cat and a frog", [[2], [5]]),
    ("two red apples on a wooden table", [[1, 2, 3], [6, 7]]),
    ("a black cat sitting next to a brown dog", [[2, 3], [8, 9]]),
    ("a dog chasing a ball", [[2], [5]]),
    ("a painting of a cat", [[2], [5]]),
    ("a big blue circle, a red square", [[2, 3, 4], [7, 8]]),
    ("a cat wearing a hat", [[2], [5]]),
    ("three birds and an apples", [[1, 2], [5]]),
]


@pytest.mark.parametrize("prompt,groups", GROUPING)
def test_group_tokens_word_level(prompt, groups):
    assert C.group_tokens(prompt, word_tokenizer(WORDS)) == groups


def test_group_tokens_keeps_multi_token_words_together():
    tok = byte_level_tokenizer()
    groups = C.group_tokens("a green glasses and a yellow clock", tok)
    # 'a' = 1, 'green' = 2..6, 'glasses' = 7..13, 'and' = 14..16, 'a' = 17, 'yellow' = 18..23, 'clock' = 24..28
    assert groups == [list(range(2, 14)), list(range(18, 29))]
    text = C.describe_groups("a green glasses and a yellow clock", tok, groups)
    assert "'g', 'r', 'e', 'e', 'n', 'g', 'l'" in text


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion(seed=0, tokenizer=word_tokenizer(WORDS))


PROMPT = "a green glasses and a yellow clock"


def _run(pipe, **kw):
    args = dict(num_inference_steps=6, generator=torch.Generator().manual_seed(0), max_iter_to_alter=3,
                iterative_refinement_steps=(0, 2), refinement_steps=4, output_type="latent", step_size=3000.0)
    args.update(kw)
    return pipe(PROMPT, token_groups=[[2, 3], [6, 7]], **args)


def test_pipeline_end_to_end(pipe, tmp_path, capsys):
    seen = []

    def cb(p, i, t, kw):
        seen.append(i)
        return {"latents": kw["latents"]}

    out = _run(pipe, return_attention_maps=True, callback_on_step_end=cb, output_type="pil")
    plain = _run(pipe, max_iter_to_alter=0, iterative_refinement_steps=(), output_type="pil")
    a, b = np.asarray(out.images[0], dtype=np.float32), np.asarray(plain.images[0], dtype=np.float32)
    assert a.shape == (32, 32, 3) and np.abs(a - b).max() > 0           # the guidance moved the latents
    assert seen == list(range(6))
    hist = [h.item() for h in out.refinement_losses[0]]
    assert len(hist) == 4 and hist[-1] < hist[0]                        # the loss falls over refinement iterations
    assert [s is not None for s in out.losses] == [True, True, True, False, False, False]
    assert len(out.attention_maps) == 6 and out.attention_maps[0].shape == (1, 8, 8, 77)
    path = tmp_path / "img.png"
    out.images[0].save(path)
    grid = C.save_attention_overlays(tmp_path / "maps.png", out.images, out.attention_maps, out.token_groups,
                                     steps=[0, 5], labels=[["green glasses", "yellow clock"]], cell=32)
    assert path.stat().st_size > 0 and grid.size == (96, 64)
    auto = pipe(PROMPT, num_inference_steps=2, max_iter_to_alter=1, iterative_refinement_steps=(), output_type="latent")
    assert auto.token_groups == [[[2, 3], [6, 7]]]
    assert "[[2, 3], [6, 7]] = [['green', 'glasses'], ['yellow', 'clock']]" in capsys.readouterr().out


def test_early_exit_and_backends_give_the_same_latents(pipe):
    base = _run(pipe, early_exit=False, backend="torch").images
    for kw in ({"early_exit": True, "backend": "torch"}, {"early_exit": True, "backend": "cpp"}):
        torch.testing.assert_close(_run(pipe, **kw).images, base, rtol=1e-4, atol=1e-4)


def test_batch_of_prompts_equals_one_at_a_time(pipe):
    p2 = "a cat and a frog"
    g = [[[2, 3], [6, 7]], [[2], [5]]]
    gen = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    both = pipe([PROMPT, p2], token_groups=g, num_inference_steps=4, generator=gen, max_iter_to_alter=2,
                iterative_refinement_steps=(0,), refinement_steps=2, output_type="latent", step_size=3000.0).images
    for k, (p, gg) in enumerate(zip([PROMPT, p2], g)):
        one = pipe(p, token_groups=gg, num_inference_steps=4, generator=torch.Generator().manual_seed(k),
                   max_iter_to_alter=2, iterative_refinement_steps=(0,), refinement_steps=2, output_type="latent",
                   step_size=3000.0).images
        torch.testing.assert_close(both[k:k + 1], one, rtol=1e-4, atol=1e-4)


def _official_loop(pipe, steps, max_iter, refine_at, n_refine, alpha, softmax=True):
    """The official ConformPipeline.__call__ loop transcribed (materialising processor, every forward)."""
    groups = [[2, 3], [6, 7]]
    cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    embeds = torch.cat([uncond, cond])
    pipe.scheduler.set_timesteps(steps)
    lat = pipe.prepare_latents(1, 4, 32, 32, cond.dtype, "cpu", torch.Generator().manual_seed(0))
    prev = None
    unet = pipe.unet
    cap = MaterializingCapture(unet, resolution=(8, 8))

    def forward_loss(z, t):
        cap.reset()
        unet(z, t, encoder_hidden_states=cond)
        m = cap.maps()
        return m, attention_nce_ref(m, groups, prev_maps=prev, softmax_normalize=softmax)

    with cap:
        for i, t in enumerate(pipe.scheduler.timesteps):
            with torch.enable_grad():
                z = lat.clone().detach().requires_grad_(True)
                m, loss = forward_loss(z, t)
                if i in refine_at:
                    for _ in range(n_refine):
                        z = z.clone().detach().requires_grad_(True)
                        m, loss = forward_loss(z, t)
                        if loss != 0:
                            z = z - alpha * torch.autograd.grad(loss, [z], retain_graph=True)[0]
                    z = z.clone().detach().requires_grad_(True)
                    m, loss = forward_loss(z, t)
                if i < max_iter and loss != 0:
                    z = z - alpha * torch.autograd.grad(loss, [z], retain_graph=True)[0]
                lat = z.detach()
            prev = m.detach()
            with torch.no_grad():
                cap.reset()
                noise = unet(torch.cat([lat] * 2), t, encoder_hidden_states=embeds).sample
                nu, nt = noise.chunk(2)
                lat = pipe.scheduler.step(nu + 7.5 * (nt - nu), t, lat).prev_sample
    return lat


@pytest.mark.parametrize("softmax", [True, False])
def test_same_latents_as_the_official_loop(pipe, softmax):
    want = _official_loop(pipe, 6, 3, (0, 2), 3, 3000.0, softmax)
    got = pipe(PROMPT, token_groups=[[2, 3], [6, 7]], num_inference_steps=6, generator=torch.Generator().manual_seed(0),
               max_iter_to_alter=3, iterative_refinement_steps=(0, 2), refinement_steps=3, step_size=3000.0,
               softmax_normalize=softmax, output_type="latent", backend="torch").images
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_pipeline_errors(pipe):
    with pytest.raises(ValueError, match="per-prompt lists"):
        pipe([PROMPT, PROMPT], token_groups=[[[2]], [[3]], [[4]]], num_inference_steps=1)
    with pytest.raises(ValueError, match="no content word"):
        pipe("a and the", num_inference_steps=1)
    with pytest.raises(ValueError, match="out of range"):
        pipe(PROMPT, token_groups=[[2], [80]], num_inference_steps=1)
    with pytest.raises(ValueError, match="step_size"):
        pipe(PROMPT, token_groups=[[2], [6]], num_inference_steps=2, step_size=[1.0, 2.0, 3.0])


def test_cli_without_weights_says_what_to_pass(tmp_path, capsys):
    from contrastgen.cli import main
    with pytest.raises(SystemExit):
        main(["conform", "--prompt", PROMPT])
    assert "pass --model PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["conform", "--model", str(tmp_path), "--prompt", PROMPT])
    assert "no model_index.json" in capsys.readouterr().err


def test_cli_runs_a_local_pipeline(pipe, tmp_path, capsys):
    from contrastgen.cli import main
    pipe.save_pretrained(tmp_path / "model")
    out, maps = tmp_path / "out.png", tmp_path / "maps.png"
    rc = main(["conform", "--model", str(tmp_path / "model"), "--prompt", PROMPT, "--groups", "2,3;6,7", "--steps", "3",
               "--max-iter-to-alter", "1", "--out", str(out), "--maps", str(maps)])
    assert rc == 0 and out.stat().st_size > 0 and maps.stat().st_size > 0
    assert "[[2, 3], [6, 7]] = [['green', 'glasses'], ['yellow', 'clock']]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["conform", "--model", str(tmp_path / "model"), "--prompt", PROMPT, "--groups", "2,x"])
