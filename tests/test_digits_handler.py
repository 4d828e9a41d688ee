"""The digits handler in-process with TorchServe's own Context: a batch that mixes good and bad rows."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml
from ts.context import Context, RequestProcessor

from tests.conftest import built_archive, png_bytes


@pytest.fixture(scope="module")
def unpacked(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("digits_mar")
    with zipfile.ZipFile(built_archive("digits")) as archive:
        archive.extractall(target)
    return target


def make_context(model_dir: Path, batch: int) -> Context:
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    context = Context("digits", str(model_dir), manifest, batch, None, "0.12.0",
                      model_yaml_config=yaml.safe_load((model_dir / "model-config.yaml").read_text()))
    context.request_processor = [RequestProcessor({}) for _ in range(batch)]
    return context


@pytest.fixture(scope="module")
def handler(unpacked: Path, monkeypatch_module: pytest.MonkeyPatch):
    monkeypatch_module.syspath_prepend(str(unpacked))
    from digits_handler import DigitsHandler  # the copy inside the archive

    instance = DigitsHandler()
    instance.initialize(make_context(unpacked, 1))
    return instance


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_bad_rows_get_their_own_status_and_good_rows_their_answer(handler, unpacked: Path, digits_split) -> None:
    _, _, x_test, y_test = digits_split
    rows = [{"body": png_bytes(x_test[0])}, {"body": b"junk"}, {"data": (x_test[1] / 255).tolist()},
            {"body": {"data": [2.0] * 64}}, {"body": {"instances": [(x_test[2] / 255).tolist()] * 2}}]
    context = make_context(unpacked, len(rows))
    out = [json.loads(b) for b in handler.handle(rows, context)]
    statuses = [context.get_response_status(i)[0] for i in range(len(rows))]
    assert statuses == [200, 400, 200, 422, 200]
    assert out[0]["label"] == str(y_test[0]) and out[2]["label"] == str(y_test[1])
    assert out[1]["type"] == "undecodable_input" and out[3]["type"] == "invalid_input"
    assert [p["label"] for p in out[4]["predictions"]] == [str(y_test[2])] * 2
    assert all(context.get_response_content_type(i) == "application/json" for i in range(len(rows)))


def test_dark_ink_on_light_paper_is_read_like_the_data_set(handler, unpacked: Path, digits_split) -> None:
    _, _, x_test, y_test = digits_split
    context = make_context(unpacked, 1)
    from PIL import Image
    big_inverted = Image.fromarray(255 - x_test[5]).resize((64, 64), Image.Resampling.NEAREST)
    import io
    buffer = io.BytesIO()
    big_inverted.save(buffer, format="JPEG", quality=95)
    answer = json.loads(handler.handle([{"body": buffer.getvalue()}], context)[0])
    assert answer["label"] == str(y_test[5])
