"""Step 6: a vision encoder + projector in front of the language model.

Masks are checked with a byte-level tokenizer (no merges: one character = one token, so every
position can be written down by hand); the scripts run at --quick size on the shared quick model.
"""
import io
import json

import numpy as np
import pytest
import torch

from common.checkpoint import load_checkpoint
from common.cli import UserError
from common.model import IGNORE_INDEX, ModelConfig, Transformer
from step1_tokenizer.bpe import Tokenizer, load_tokenizer, tokenizer_fingerprint
from step4_sft.chat import chat_loop
from step4_sft.chat_template import shift_labels
from step6_multimodal import chat, data, train_vlm
from step6_multimodal.chat import ImageChatSession
from step6_multimodal.data import (QUESTION_KINDS, caption, collate_images, conversation_about,
                                   encode_image_conversation, generated_batch, held_out_set, load_image_examples)
from step6_multimodal.evaluate import answer, eval_examples, last_answer_only, score
from step6_multimodal.images import (IMAGE_SIZE, KINDS, Shape, draw, load_image, load_pixels, random_scene, save_png,
                                     to_tensor)
from step6_multimodal.pretrain_encoder import COLOUR_NAMES, PatchLabeller, patch_labels, slot_labels
from step6_multimodal.vision import VisionConfig, VisionEncoder, VisionLanguageModel, load_vlm, pixel_shuffle

QUICK_VISION = train_vlm.QUICK_VISION


@pytest.fixture(scope="module")
def byte_tok():
    """No merges: ids 0-255 are bytes, then <|endoftext|> 256, <|im_start|> 257, <|im_end|> 258, <image> 259."""
    return Tokenizer([])


def tiny_vlm(vocab_size=260, vision=QUICK_VISION, image_id=259, seed=0):
    torch.manual_seed(seed)
    lm = Transformer(ModelConfig(vocab_size=vocab_size, block_size=128, n_layer=2, n_head=4, n_kv_head=2, n_embd=32))
    return VisionLanguageModel(lm, vision, image_id).eval()


def scene_picture(seed=0, n=3):
    return draw(random_scene(np.random.default_rng(seed), n))


@pytest.fixture(scope="module")
def trained(quick_run):
    """train_vlm.py --quick on the shared quick model, and the run's outputs (in the tests' out/quick/step6)."""
    from common.paths import step_dir

    result = train_vlm.main(["--quick", "--checkpoint", str(quick_run.model), "--tokenizer", str(quick_run.tokenizer)])
    out = step_dir(6)
    return result, out, load_tokenizer(quick_run.tokenizer), quick_run.tokenizer


@pytest.mark.verifies(6, "The number of image positions equals what the encoder produces")
@pytest.mark.parametrize("vision, n", [(VisionConfig(), 6), (VisionConfig(slots=0), 16), (QUICK_VISION, 6)],
                         ids=["default", "patch_tokens", "quick"])
def test_image_positions_match_encoder(byte_tok, vision, n):
    vlm = tiny_vlm(vision=vision)
    messages = conversation_about(random_scene(np.random.default_rng(1), 2), "left_right", np.random.default_rng(1))
    ids, _ = encode_image_conversation(byte_tok, messages, vlm.n_image_tokens)
    features = vlm.image_features(to_tensor(scene_picture())[None])
    assert ids.count(byte_tok.image_id) == features.shape[1] == vision.n_image_tokens == n
    # the resampler's slots (one per colour), or every patch folded 2x2 by pixel shuffle: (32/4/2)^2
    # one image too few or too many is a clear error, not a shape error deep inside
    idx = torch.tensor([ids])
    with pytest.raises(UserError, match="every <image> tag needs one image"):
        vlm(idx, torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))


@pytest.mark.verifies(6, "Image positions and user tokens carry no loss (mask checked position by position)")
def test_loss_mask_by_position(byte_tok):
    n = 4
    messages = [{"role": "user", "content": "<image>\nHi?"}, {"role": "assistant", "content": "no"},
                {"role": "user", "content": "And?"}, {"role": "assistant", "content": "yes"}]
    ids, mask = encode_image_conversation(byte_tok, messages, n)
    S, E, I = byte_tok.im_start_id, byte_tok.im_end_id, byte_tok.image_id
    expected_ids = ([S] + list(b"user\n") + [ord(" ")] + [I] * n + list(b"\nHi?") + [E, 10]
                    + [S] + list(b"assistant\n") + list(b" no") + [E, 10]
                    + [S] + list(b"user\n") + list(b" And?") + [E, 10]
                    + [S] + list(b"assistant\n") + list(b" yes") + [E, 10])
    expected_mask = ([0] * (1 + 5 + 1 + n + 4 + 2) + [0] * 11 + [1] * 4 + [0]
                     + [0] * (1 + 5 + 5 + 2) + [0] * 11 + [1] * 5 + [0])
    assert ids == expected_ids
    assert mask == expected_mask
    inputs, targets = shift_labels(torch.tensor(ids), torch.tensor(mask))
    scored = [i for i, t in enumerate(targets.tolist()) if t != IGNORE_INDEX]
    assert all(ids[i + 1] != I for i in scored)  # no image position is ever a target
    assert [ids[i + 1] for i in scored] == list(b" no") + [E] + list(b" yes") + [E]
    # the evaluation scores only the last answer
    assert last_answer_only(mask) == [0] * (len(mask) - 6) + [1] * 5 + [0]


@pytest.mark.verifies(6, "Replacing the image changes the answer's logits while the logits of text positions "
                            "before the image are unchanged")
def test_image_changes_only_later_logits(byte_tok):
    vlm = tiny_vlm()
    messages = [{"role": "user", "content": "Look: <image>\nWhat colour is the circle?"}]
    ids, _ = encode_image_conversation(byte_tok, messages, vlm.n_image_tokens)
    idx = torch.tensor([ids])
    first_image = ids.index(byte_tok.image_id)
    with torch.no_grad():
        a, _ = vlm(idx, to_tensor(scene_picture(0))[None])
        b, _ = vlm(idx, to_tensor(scene_picture(1))[None])
    assert torch.equal(a[0, :first_image], b[0, :first_image])
    assert (a[0, -1] - b[0, -1]).abs().max() > 1e-4


@pytest.mark.verifies(6, "The language model's weights are unchanged by stage 1")
def test_stage1_freezes_language_model(quick_run, tmp_path):
    tok = load_tokenizer(quick_run.tokenizer)
    from common.checkpoint import load_model

    vlm = VisionLanguageModel(load_model(quick_run.model), QUICK_VISION, tok.image_id)
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    vlm.encoder.requires_grad_(False)  # as train_vlm.main does after stage 0
    settings = {**train_vlm.PROFILES["quick"], "stage1_steps": 3}
    train_vlm.align(vlm, tok, settings, seed=0, device=torch.device("cpu"), out_dir=tmp_path)
    changed = {k.split(".")[0] for k, v in vlm.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"projector"}  # the language model and the frozen encoder untouched


@pytest.mark.verifies(6, "Stage 0's labels name, patch by patch, the colour, kind and centre of the shape covering it")
def test_stage0_patch_labels():
    # a red square filling the top-left 8x8 pixels and a blue triangle in the box x 16..27, y 16..27;
    # 4x4-pixel patches: an 8x8 grid, reading order
    square, triangle = Shape("square", "red", 0, 0, 8), Shape("triangle", "blue", 16, 16, 12)
    labels = patch_labels([square, triangle], patch_size=4)
    colour, kind = labels["colour"].reshape(8, 8), labels["kind"].reshape(8, 8)
    red, blue = COLOUR_NAMES.index("red") + 1, COLOUR_NAMES.index("blue") + 1
    assert (colour[:2, :2] == red).all() and (kind[:2, :2] == KINDS.index("square") + 1).all()
    # the triangle (apex at the top centre, x 22): its top row of patches (y 16..19) covers half of the
    # middle patch and nothing else; the next rows cover a quarter or more of all three columns (x 16..27)
    assert colour[4].tolist() == [0, 0, 0, 0, 0, blue, 0, 0]
    assert colour[5].tolist() == colour[6].tolist() == [0, 0, 0, 0, blue, blue, blue, 0]
    assert set(kind[colour == blue].tolist()) == {KINDS.index("triangle") + 1}
    assert (colour > 0).sum() == 4 + 7  # nothing else is labelled
    assert labels["centre"][0].tolist() == [-0.75, -0.75]  # the square's centre (4, 4) on a -1..1 scale
    assert labels["centre"][6 * 8 + 5].tolist() == [0.375, 0.375]  # the triangle's (22, 22)
    assert not labels["centre"][colour.ravel() == 0].any()
    empty = patch_labels([], patch_size=4)
    assert not empty["colour"].any() and not empty["kind"].any()
    # the resampler's targets: slot i speaks for the i-th colour (red, green, blue, yellow, purple, white)
    slots = slot_labels([square, triangle])
    assert slots["slot_kind"].tolist() == [KINDS.index("square") + 1, 0, KINDS.index("triangle") + 1, 0, 0, 0]
    assert slots["slot_centre"].tolist() == [[-0.75, -0.75], [0, 0], [0.375, 0.375], [0, 0], [0, 0], [0, 0]]
    with pytest.raises(UserError, match="one slot per colour: slots must be 6, not 4"):
        PatchLabeller(VisionEncoder(VisionConfig(slots=4)))


@pytest.mark.verifies(6, "Stage 0 trains the encoder alone, and its patch loss falls")
def test_stage0_trains_encoder_only(quick_run, tmp_path):
    tok = load_tokenizer(quick_run.tokenizer)
    from common.checkpoint import load_model

    vlm = VisionLanguageModel(load_model(quick_run.model), VisionConfig(), tok.image_id)
    before = {k: v.clone() for k, v in vlm.state_dict().items()}
    settings = {**train_vlm.PROFILES["quick"], "stage0_steps": 60, "stage0_batch_size": 16}
    result = train_vlm.see(vlm, settings, seed=0, device=torch.device("cpu"), out_dir=tmp_path)
    changed = {k.split(".")[0] for k, v in vlm.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"encoder"}  # the resampler is part of the encoder; projector and LM untouched
    losses = load_checkpoint(tmp_path / "stage0_checkpoint.pt")["history"]["loss"]
    # guessing: ln 7 (a patch's colour) + ln 4 (its kind) + ln 4 (a slot's kind) = 4.7 nats, plus the centres' error
    assert losses[0] > 4.7 and np.mean(losses[-5:]) < 3.0
    assert set(result["patch_accuracy"]) == {"colour", "kind", "centre_error_pixels", "slot_kind", "slot_empty",
                                             "slot_centre_error_pixels"}


@pytest.mark.verifies(6, "The projector maps the encoder's width to the model's width")
def test_projector_widths():
    images = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    for slots in (6, 0):  # the resampler's slots; every patch, pixel-shuffled (and a stem: the options too)
        vision = VisionConfig(width=48, n_head=4, stem_width=8, slots=slots)
        vlm = tiny_vlm(vision=vision)
        assert vlm.encoder.patches(images).shape == (3, vision.grid ** 2, 48)
        seen = vlm.encoder(images)
        assert seen.shape == (3, slots or vision.grid ** 2, 48)
        assert vlm.projector(seen).shape == (3, vision.n_image_tokens, vlm.config.n_embd)
    # a checkpoint saved before slots and the output norm existed loads as what it was: patch tokens, no norm
    old = VisionConfig.from_dict({"patch_size": 4, "width": 128})
    assert (old.slots, old.norm_output, old.n_image_tokens) == (0, False, 16)
    # pixel shuffle folds each 2x2 square of neighbouring patches into one vector, in reading order
    grid = torch.arange(16.0).view(1, 16, 1)  # a 4x4 grid of patch numbers
    assert pixel_shuffle(grid, 4, 2)[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


@pytest.mark.verifies(6, "A saved checkpoint reloads and gives the same answers")
def test_checkpoint_round_trip(trained, tmp_path):
    result, out, tok, tokenizer_path = trained
    vlm = load_vlm(result["model_path"])
    held_out = held_out_set(2)
    examples = eval_examples(tok, held_out, vlm.n_image_tokens)[:8]
    batch = collate_images(examples, tok.eot_id)
    again = load_vlm(result["model_path"], tokenizer_fingerprint=tokenizer_fingerprint(tokenizer_path))
    assert again.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer_path)  # saved by train_vlm.py
    with pytest.raises(UserError, match="was trained with another tokenizer"):
        load_vlm(result["model_path"], tokenizer_fingerprint="0" * 16)
    with torch.no_grad():
        assert torch.equal(vlm(batch["idx"], batch["images"])[0], again(batch["idx"], batch["images"])[0])
    kind, pixels, messages = held_out[0]
    assert answer(vlm, tok, messages[:-1], to_tensor(pixels)[None]) == answer(again, tok, messages[:-1],
                                                                               to_tensor(pixels)[None])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="bad.pt"):
        load_vlm(tmp_path / "bad.pt")


@pytest.mark.verifies(6, "A PNG and the same image as high-quality JPEG give the same answer")
def test_png_and_jpeg_same_answer(trained, tmp_path):
    from PIL import Image

    result, out, tok, tokenizer_path = trained
    vlm = load_vlm(result["model_path"])
    for seed in range(3):
        pixels = scene_picture(seed)
        save_png(pixels, tmp_path / f"{seed}.png")
        Image.fromarray(pixels).save(tmp_path / f"{seed}.jpg", quality=95)
        png, jpeg = load_image(tmp_path / f"{seed}.png"), load_image(tmp_path / f"{seed}.jpg")
        assert torch.equal(png, to_tensor(pixels))           # PNG is lossless
        assert (png - jpeg).abs().mean() < 0.05               # JPEG at quality 95 is close
        for kind in QUESTION_KINDS[:4]:
            messages = conversation_about(random_scene(np.random.default_rng(seed), 3), kind,
                                          np.random.default_rng(seed)) or []
            question = messages[:1] or [{"role": "user", "content": "How many shapes are there?\n<image>"}]
            assert answer(vlm, tok, question, png[None]) == answer(vlm, tok, question, jpeg[None])


@pytest.mark.verifies(6, "Grayscale, palette and RGBA images are converted to RGB on the black background, "
                            "and any size is resized")
def test_image_conversions(tmp_path):
    from PIL import Image

    pixels = scene_picture(2, 4)
    rgba = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 4), dtype=np.uint8)
    rgba[..., :3], rgba[..., 3] = 255, 0           # white but fully transparent: black after conversion
    rgba[:8, :8] = (230, 40, 40, 255)              # an opaque red corner
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    got = load_pixels(tmp_path / "rgba.png")
    assert got[:8, :8].tolist() == [[[230, 40, 40]] * 8] * 8 and got[8:].max() == 0
    Image.fromarray(pixels).convert("L").save(tmp_path / "gray.png")
    gray = load_pixels(tmp_path / "gray.png")
    assert gray.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and (gray[..., 0] == gray[..., 2]).all()
    Image.fromarray(pixels).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(tmp_path / "palette.png")
    assert np.abs(load_pixels(tmp_path / "palette.png").astype(int) - pixels).mean() < 10
    Image.fromarray(pixels).resize((1600, 1200), Image.Resampling.NEAREST).save(tmp_path / "big.jpg", quality=95)
    assert load_pixels(tmp_path / "big.jpg").shape == (IMAGE_SIZE, IMAGE_SIZE, 3)


@pytest.mark.verifies(6, "A missing, unreadable or truncated image file gives a one-line error naming the file")
def test_bad_image_files(tmp_path):
    save_png(scene_picture(), tmp_path / "ok.png")
    whole = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "text.png").write_text("hello")
    for name, why in [("missing.png", "not found"), ("text.png", "not an image"), ("cut.png", "damaged or truncated")]:
        with pytest.raises(UserError, match=why) as err:
            load_image(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)


@pytest.mark.verifies(6, "A bad JSONL line (no or unreadable image, <image> tags that do not match the images) "
                            "is skipped with a count, or refused with --strict")
def test_bad_lines_skipped_or_refused(byte_tok, tmp_path, capsys):
    save_png(scene_picture(), tmp_path / "pics" / "a.png")
    ask = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "a"}]
    no_tag = [{"role": "user", "content": "What is it?"}, {"role": "assistant", "content": "a"}]
    two_tags = [{"role": "user", "content": "<image> <image>"}, {"role": "assistant", "content": "a"}]
    lines = [{"image": "pics/a.png", "conversations": ask},      # good (path relative to the JSONL's folder)
             {"conversations": ask},                            # <image> without an image
             {"image": "pics/a.png", "conversations": no_tag},  # an image without <image>
             {"image": "pics/a.png", "conversations": two_tags},  # more tags than images
             {"image": "pics/nope.png", "conversations": ask},  # missing file
             {"image": ["pics/a.png", "pics/a.png"], "conversations": two_tags}]  # good: two images
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n{broken\n")
    examples = load_image_examples(path, byte_tok, 400, n_image_tokens=4)
    assert [e.line for e in examples] == [1, 6]
    assert [tuple(e.images.shape) for e in examples] == [(1, 3, IMAGE_SIZE, IMAGE_SIZE), (2, 3, IMAGE_SIZE, IMAGE_SIZE)]
    summary = capsys.readouterr().out
    assert "skipped 5 of 7" in summary and "not valid JSON (first at line 7)" in summary
    with pytest.raises(UserError, match=r"mine.jsonl, line 2: 1 <image> tag\(s\) but no \"image\" path"):
        load_image_examples(path, byte_tok, 400, strict=True, n_image_tokens=4)
    batch = collate_images(examples, byte_tok.eot_id)
    assert int((batch["idx"] == byte_tok.image_id).sum()) == 3 * 4 and batch["images"].shape[0] == 3


@pytest.mark.verifies(6, "Generated questions have the answers their pictures imply, and the held-out pictures "
                            "are never drawn in training")
def test_generated_answers_and_held_out(byte_tok):
    scene = [Shape("circle", "red", 2, 20, 8), Shape("square", "blue", 20, 2, 8), Shape("circle", "white", 12, 10, 7)]
    rng = np.random.default_rng(0)
    assert caption(scene) == "a red circle, a white circle and a blue square"
    assert conversation_about(scene, "colour", rng)[1]["content"] == "blue"     # the only square
    assert conversation_about(scene, "count", rng)[1]["content"] == "3"
    for _ in range(20):
        q, a = (m["content"] for m in conversation_about(scene, "left_right", rng))
        if "white" not in q:  # the red circle is left of the blue square
            assert a == ("left" if q.index("red") < q.index("blue") else "right")
    picture = draw(scene)
    assert tuple(picture[24, 6]) == (230, 40, 40) and tuple(picture[6, 24]) == (50, 90, 245)
    held_out = {kind_pixels[1].tobytes() for kind_pixels in held_out_set(10)}
    blank = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8).tobytes()
    for step in range(20):
        images = generated_batch(byte_tok, data.STAGE2_MIX, 16, 0, step, 0, 400, 4)["images"]
        for image in images:
            pixels = ((image.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy().tobytes()
            assert pixels == blank or pixels not in held_out


@pytest.mark.verifies(6, "train_vlm.py writes metrics.json (accuracy by question kind, the blank-image baseline, "
                            "seconds per stage, parameters by part) and the answers grid")
def test_training_outputs(trained):
    result, out, tok, tokenizer_path = trained
    for key in ("vqa_acc", "blank_image_acc"):  # the overall share and one per kind of question
        assert set(result[key]) == {"overall", *QUESTION_KINDS}
        assert all(0.0 <= v <= 1.0 for v in result[key].values())
    written = json.loads((out / "metrics.json").read_text())
    assert written["vqa_acc"] == result["vqa_acc"] and written["params"] == result["params"]
    assert result["stage1"]["train_seconds"] > 0 and result["stage2"]["train_seconds"] > 0
    params = result["params"]
    # stage 0: the encoder and its labelling heads; then the encoder is frozen: stage 1 trains the
    # projector alone, stage 2 the projector and the language model
    heads = result["stage0"]["trainable_params"] - params["encoder"]
    assert heads == 13 * QUICK_VISION.width + 13 + 6 * QUICK_VISION.width + 6  # (7 colours, 4 kinds, x, y), (4 kinds, x, y)
    assert result["stage1"]["trainable_params"] == params["projector"]
    assert result["stage2"]["trainable_params"] == params["projector"] + params["language_model"]
    assert set(result["stage0"]["patch_accuracy"]) >= {"colour", "kind", "slot_kind"}
    assert set(result["params"]) == {"encoder", "projector", "language_model"}
    assert (out / "answers.png").stat().st_size > 1000
    # the scores are what the greedy answers say
    vlm = load_vlm(result["model_path"])
    held_out = held_out_set(train_vlm.PROFILES["quick"]["eval_per_kind"],
                            data.fits_context(tok, vlm.config.block_size + 1, vlm.n_image_tokens))
    examples = eval_examples(tok, held_out, vlm.n_image_tokens)
    right = score(vlm, examples, tok.eot_id)
    for (kind, pixels, messages), ok in list(zip(held_out, right))[::7]:
        assert ok == (answer(vlm, tok, messages[:-1], to_tensor(pixels)[None]) == messages[-1]["content"])
    assert result["vqa_acc"]["overall"] == pytest.approx(np.mean(right))


@pytest.mark.verifies(6, "chat.py answers questions about an image and refuses <image> without one")
def test_chat(trained, byte_tok, tmp_path):
    result, out, tok, tokenizer_path = trained
    vlm = tiny_vlm()  # an untrained model with room for two turns: the mechanics, not the answers
    save_png(scene_picture(), tmp_path / "pic.png")
    session = ImageChatSession(vlm, byte_tok, load_image(tmp_path / "pic.png"), max_new_tokens=6)
    shown = io.StringIO()
    assert chat_loop(session, ["How many shapes are there?", "What colour is it?"], shown, interactive=False) == 2
    assert session.messages[0]["content"] == "How many shapes are there?\n<image>"
    assert len(session.messages) == 4 and session.messages[2]["content"] == "What colour is it?"
    assert shown.getvalue().count("assistant> ") == 2 and "does not fit" not in shown.getvalue()
    no_image = ImageChatSession(vlm, byte_tok, None)
    assert "pass --image" in "".join(no_image.send("<image>\nWhat is this?"))
    assert no_image.messages == []
    with pytest.raises(UserError, match="nope.png: image file not found"):
        chat.main(["--image", str(tmp_path / "nope.png"), "--checkpoint", str(result["model_path"]),
                   "--tokenizer", str(tokenizer_path)])


@pytest.mark.verifies(6, "The step 6 notebook runs top to bottom")
def test_notebook_runs():
    from tests.notebooks import has_image, outputs_text, run_notebook

    notebook = run_notebook("step6_multimodal/step6_multimodal.ipynb")
    text = outputs_text(notebook)
    assert "(6 of them)" in text and "loss on an image position: False" in text
    assert "slots by hand == the encoder: True" in text
    assert "patch embedding as one matrix == the conv: True" in text
    assert "same embeddings as vision.py: True" in text
    assert has_image(notebook)


def test_lora_stage2_trains_only_adapters_and_saves_a_plain_model(quick_run, tmp_path):
    result = train_vlm.main(["--quick", "--checkpoint", str(quick_run.model), "--tokenizer", str(quick_run.tokenizer),
                             "--out", str(tmp_path), "--lora_r", "4", "--stage1_steps", "2", "--stage2_steps", "3"])
    lora_params = result["stage2"]["trainable_params"] - result["params"]["projector"]  # the encoder is frozen
    assert 0 < lora_params < result["params"]["language_model"] / 4  # the adapters, not the whole LM
    assert result["stage2_lm"] == "lora r=4"
    vlm = load_vlm(result["model_path"])  # merged: the same keys as a model trained without LoRA
    assert not any("lora" in key for key in vlm.state_dict())
    # a run with --out keeps its figures beside its model
    assert json.loads((tmp_path / "metrics.json").read_text())["stage2_lm"] == "lora r=4"
