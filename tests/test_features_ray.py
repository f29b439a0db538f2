"""`t2i-data features --engine ray`: encoder actors on a local Ray write exactly the rows of the
local engine (same keys, same tensors within float tolerance, same failures), and a rerun resumes
with nothing to do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from shards import complete_shards
from test_features_images import decode_raw, fcfg, features, many_images, models, rows  # noqa: F401 - models is a fixture


def tensors(row: dict) -> dict[str, torch.Tensor]:
    return {"latent_mean": decode_raw(row["latent_mean"], row["latent_dtype"], row["latent_shape"]),
            "latent_std": decode_raw(row["latent_std"], row["latent_dtype"], row["latent_shape"]),
            "text_emb": decode_raw(row["text_emb"], row["text_dtype"], (-1, row["text_channels"]))}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ray_engine_writes_exactly_the_rows_of_the_local_engine(tmp_path, models):
    ray = pytest.importorskip("ray")
    from t2i.feature_index import fingerprint, load_index
    from t2i.features_ray import compute_features_ray

    caps = many_images(tmp_path, 24)
    (tmp_path / "imgs" / "3.jpg").write_bytes(b"\xff\xd8\xff not a jpeg any more")  # fails to decode at feature time
    local, one = features(caps, tmp_path / "local", fcfg(models))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        r = compute_features_ray(caps, tmp_path / "ray", fcfg(models), replicas=2, progress=False)
        again = compute_features_ray(caps, tmp_path / "ray", fcfg(models), replicas=2, progress=False)
    finally:
        ray.shutdown()
    fdir = Path(r["dir"])
    assert fdir.name == Path(local["dir"]).name  # the same cache key: either engine resumes the other's run
    assert {s.name.split("-")[1] for s in complete_shards(fdir)} == {"ray"}
    got = rows(fdir)
    two = {x["key"]: x for x in got}
    assert len(got) == len(two) == len(one) == r["rows"] == r["new"] == 23 and set(two) == set(one)
    assert (r["failed"], local["failed"], r["valid"], r["skipped_invalid"]) == (1, 1, local["valid"], local["skipped_invalid"])
    failures = [json.loads((d / "manifest.json").read_text())["failures"] for d in (fdir, Path(local["dir"]))]
    assert [[(f["key"], f["error"].split(":")[0]) for f in fs] for fs in failures] == [[("imgs/3.jpg", "UnidentifiedImageError")]] * 2
    for key, a in one.items():
        b = two[key]
        assert {k: b[k] for k in ("caption", "height", "width", "latent_shape", "text_len")} == {k: a[k] for k in ("caption", "height", "width", "latent_shape", "text_len")}
        ta, tb = tensors(a), tensors(b)
        for name in ta:
            torch.testing.assert_close(tb[name], ta[name], rtol=1e-4, atol=1e-5)
    assert again["new"] == 0 and again["rows"] == 23 and len(rows(fdir)) == 23  # resumed: nothing encoded twice
    shards = [str(s) for s in complete_shards(fdir)]  # the driver cached the loader's index, valid for these shards
    assert load_index(fdir, fingerprint(shards, fcfg(models).caption_fields)) is not None


def test_unknown_features_engine_is_a_one_line_error(tmp_path):
    from typer.testing import CliRunner

    import cli

    r = CliRunner().invoke(cli.app, ["features", "--shards", str(tmp_path), "--out", str(tmp_path / "f"), "--engine", "spark"])
    assert r.exit_code == 2 and "error: unknown --engine 'spark': use local or ray" in r.output and "Traceback" not in r.output
