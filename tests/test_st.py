"""A saved folder is a sentence-transformers model: same vectors as PolyEmbedder.encode, prompts,
truncate_dim, images and text+image, the `add` command, and clear errors (real sentence-transformers)."""
from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sentence_transformers as st  # [eval] extra, installed by make setup

from vipoly.st import MODULE_TYPE, MODULES_FILE, ST_CONFIG_FILE, default_task, load, read_st_config, write_st_files  # noqa: E402
from vipoly.tasks import TASKS, prefix  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
TEXTS = ["Thủ đô của Việt Nam là gì?", "Hà Nội là thủ đô của Việt Nam.", "The cat sleeps on the sofa.", "北京是中国的首都。",
         "xin chào"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def st_model(tiny_model_dir):
    return st.SentenceTransformer(str(tiny_model_dir), trust_remote_code=True)


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))


def _images():
    red = Image.new("RGB", (40, 30), (200, 20, 20))
    blue = Image.new("RGB", (24, 56), (10, 20, 220))
    return red, blue


def test_saved_folder_names_vipoly_module_and_task_prompts(tiny_model_dir):
    modules = json.loads((tiny_model_dir / MODULES_FILE).read_text())
    assert modules == [{"idx": 0, "name": "0", "path": "", "type": MODULE_TYPE}]
    config = read_st_config(tiny_model_dir)
    assert config["prompts"] == {t: prefix(t) for t in TASKS}
    assert config["default_prompt_name"] is None and config["similarity_fn_name"] == "cosine"
    assert not list(tiny_model_dir.glob("*.py")), "the folder holds no code"


def test_st_encode_equals_polyembedder_encode(st_model, tiny_model):
    for task in (None, "instr", "text_pair", "ocr"):
        ours = tiny_model.encode(TEXTS, task=task)
        theirs = st_model.encode(TEXTS, prompt_name=task, batch_size=2) if task else st_model.encode(TEXTS, batch_size=2)
        assert theirs.shape == ours.shape == (len(TEXTS), tiny_model.embedding_dim)
        np.testing.assert_allclose(theirs, ours, atol=ATOL)
    # the prompt text itself selects the task, and so does ST's pass-through `task=`
    np.testing.assert_allclose(st_model.encode(TEXTS, prompt=prefix("vqa_multi")), tiny_model.encode(TEXTS, task="vqa_multi"), atol=ATOL)
    np.testing.assert_allclose(st_model.encode(TEXTS, task="instr"), tiny_model.encode(TEXTS, task="instr"), atol=ATOL)
    # a prompt that is no task prefix is put before the text, as ST does for its own models
    np.testing.assert_allclose(st_model.encode(TEXTS[:2], prompt="query: "),
                               tiny_model.encode(["query: " + t for t in TEXTS[:2]]), atol=ATOL)


def test_images_and_text_image_pairs_through_st(st_model, tiny_model, tmp_path):
    red, blue = _images()
    path = tmp_path / "blue.png"
    blue.save(path)
    png = io.BytesIO()
    red.save(png, format="PNG")
    import base64

    import torch

    uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    chw = torch.from_numpy(np.array(blue)).permute(2, 0, 1)
    inputs = [red, str(path), png.getvalue(), np.asarray(blue), uri, chw,
              {"text": "hóa đơn tiền điện", "image": red}, {"image": [red, blue]}, "chỉ có chữ"]
    got = st_model.encode(inputs, prompt_name="vqa_single", batch_size=3)  # one mixed batch: ST's "message" modality
    want = np.concatenate([
        tiny_model.encode(images=[red, blue, red, blue, red, blue], task="vqa_single"),
        tiny_model.encode(texts=["hóa đơn tiền điện"], images=[red], task="vqa_single"),
        tiny_model.encode(images=[[red, blue]], task="vqa_single"),
        tiny_model.encode(["chỉ có chữ"], task="vqa_single")])
    np.testing.assert_allclose(got, want, atol=ATOL)
    assert st_model.supports("image") and st_model.supports(("image", "text"))


def test_truncate_dim_is_the_matryoshka_prefix(tiny_model_dir, tiny_model):
    k = 16
    small = st.SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, truncate_dim=k)
    full = tiny_model.encode(TEXTS, task="instr")
    cut = small.encode(TEXTS, prompt_name="instr")
    assert cut.shape == (len(TEXTS), k) and small.get_embedding_dimension() == k
    np.testing.assert_allclose(cut, full[:, :k], atol=ATOL)  # ST truncates without renormalising…
    np.testing.assert_allclose(small.encode(TEXTS, prompt_name="instr", normalize_embeddings=True),
                               tiny_model.encode(TEXTS, task="instr", dim=k), atol=ATOL)  # …normalised: encode(dim=k)
    sims = small.similarity(cut, cut).numpy()  # cosine, ST's default: the same as the renormalised prefix
    ours = tiny_model.encode(TEXTS, task="instr", dim=k)
    np.testing.assert_allclose(sims, ours @ ours.T, atol=ATOL)


def test_st_needs_the_flag_and_vipoly_st_load_does_not(tiny_model_dir, tiny_model):
    # sentence-transformers ≥ 6 imports no module class outside its own package without the flag,
    # an installed one included; the folder holds no code either way.
    with pytest.raises(ValueError, match="trust_remote_code"):
        st.SentenceTransformer(str(tiny_model_dir))
    model = load(tiny_model_dir)
    np.testing.assert_allclose(model.encode(TEXTS, prompt_name="instr"), tiny_model.encode(TEXTS, task="instr"), atol=ATOL)
    assert model.prompts["instr"] == prefix("instr")


def test_model_kwargs_set_how_the_model_runs(tiny_model_dir):
    model = st.SentenceTransformer(str(tiny_model_dir), trust_remote_code=True,
                                   model_kwargs={"max_length": 16, "torch_dtype": "float32"})
    assert model.max_seq_length == 16
    model.max_seq_length = 12
    long = model[0].preprocess(["một câu rất dài " * 20])
    assert long["input_ids"].shape[1] == 12
    with pytest.raises(ValueError, match=r"model_kwargs \['device_map'\] are not used"):
        st.SentenceTransformer(str(tiny_model_dir), trust_remote_code=True, model_kwargs={"device_map": "auto"})


def test_default_prompt_from_the_training_config(model_copy, tiny_model):
    config = {"data": {"mix": {"text_pair": 1, "instr": 3, "ocr": 1}}}
    assert default_task(config) == "instr"
    assert default_task({"data": {"mix": {"my_source": 1.0, "instr": 2}}}) is None  # sources: no task known
    write_st_files(model_copy, default_task(config))
    model = st.SentenceTransformer(str(model_copy), trust_remote_code=True)
    assert model.default_prompt_name == "instr"
    want = tiny_model.encode(TEXTS, task="instr")
    np.testing.assert_allclose(model.encode(TEXTS), want, atol=ATOL)
    np.testing.assert_allclose(model.encode_query(TEXTS), want, atol=ATOL)  # the `query` prompt names it too
    np.testing.assert_allclose(model.encode_document(TEXTS), want, atol=ATOL)
    np.testing.assert_allclose(model.encode(TEXTS, prompt_name="ocr"), tiny_model.encode(TEXTS, task="ocr"), atol=ATOL)


def test_bad_inputs_and_names_fail_clearly(st_model):
    with pytest.raises(ValueError, match=r"Prompt name 'nope' not found"):
        st_model.encode(["x"], prompt_name="nope")
    with pytest.raises(ValueError, match=r"task='nope'"):
        st_model.encode(["x"], task="nope")
    with pytest.raises(ValueError, match=r"inputs\[0\].*bi-encoder"):
        st_model.encode([("a", "b")])
    with pytest.raises(ValueError, match=r"inputs\[0\].*chat-style"):
        st_model.encode([[{"role": "user", "content": "hi"}]])
    with pytest.raises(ValueError, match=r"URLs are not fetched"):
        st_model.encode([{"image": "https://example.com/cat.png"}])
    with pytest.raises(ValueError, match=r"inputs\[0\].*'text' and/or 'image'"):
        st_model.encode([{"text": "a", "caption": "b"}])
    with pytest.raises(ValueError, match=r"'audio\+text' is not supported"):  # sentence-transformers' own check
        st_model.encode([{"text": "a", "audio": "b.wav"}])


def test_add_command_restores_the_files_and_reads_the_run(tiny_model_dir, tmp_path, tiny_model):
    from vipoly.st.__main__ import main

    run = tmp_path / "run"
    model_dir = Path(shutil.copytree(tiny_model_dir, run / "model"))
    for name in (MODULES_FILE, ST_CONFIG_FILE):
        (model_dir / name).unlink()  # a folder saved before vipoly wrote these files
    with pytest.raises(ValueError, match=re.escape(str(model_dir / MODULES_FILE))):
        read_st_config(model_dir)
    (run / "config.yaml").write_text("data:\n  mix: {text_pair: 0.2, ocr: 0.5, instr: 0.3}\n")
    assert main(["add", str(model_dir)]) == 0
    assert read_st_config(model_dir)["default_prompt_name"] == "ocr"  # the run's heaviest task
    assert (model_dir / "README.md").is_file(), "a folder without a card gets one"
    model = st.SentenceTransformer(str(model_dir), trust_remote_code=True)
    np.testing.assert_allclose(model.encode(TEXTS[:2]), tiny_model.encode(TEXTS[:2], task="ocr"), atol=ATOL)
    assert main(["add", str(model_dir), "--default-prompt", "none"]) == 0
    assert read_st_config(model_dir)["default_prompt_name"] is None
    with pytest.raises(SystemExit, match="not a saved PolyEmbedder"):
        main(["add", str(tmp_path)])


def test_st_config_errors_name_file_and_key(model_copy):
    path = model_copy / ST_CONFIG_FILE
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "default_prompt_name": "nope"}))
    with pytest.raises(ValueError, match=re.escape(f"{path}: key 'default_prompt_name'")):
        read_st_config(model_copy)
    path.write_text(json.dumps({**config, "prompts": {"instr": "<instr> "}}))
    with pytest.raises(ValueError, match=r"key 'prompts' lacks the task prompt\(s\) \['text_pair'"):
        read_st_config(model_copy)
    with pytest.raises(ValueError, match="not a task"):
        write_st_files(model_copy, "nope")


def test_st_save_round_trip_writes_safetensors_only(st_model, tmp_path, tiny_model):
    out = tmp_path / "saved"
    st_model.save(str(out))
    assert not [p for p in out.rglob("*") if p.suffix in (".bin", ".pt", ".pkl", ".py")]
    again = st.SentenceTransformer(str(out), trust_remote_code=True)
    np.testing.assert_allclose(again.encode(TEXTS, prompt_name="instr"), tiny_model.encode(TEXTS, task="instr"), atol=ATOL)


def test_readme_sentence_transformers_example_runs(tiny_model_dir, tmp_path, capsys):
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S) if "SentenceTransformer(" in b]
    assert blocks, "README has no sentence-transformers example"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "bill.png")
    code = blocks[0].replace("runs/demo/model", str(tiny_model_dir)).replace("runs/demo/bill.png", str(tmp_path / "bill.png"))
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    assert scope["pair"].shape[0] == 1 and scope["small"].shape[1] == 16
