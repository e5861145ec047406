"""DVC stage `export`: merged model -> ONNX (+ parity through ONNX Runtime) -> TensorRT engine where
possible, a Triton model repository, and the model registered in MLflow."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from export import aoti, onnx_export, tensorrt_engine, triton
from pipeline import adapter as adapter_io
from pipeline import tracking
from pipeline.data.benchmarks import class_names, fold_classes, prepared_dir, split_dir
from pipeline.data.episodes import MEAN, STD, fixed_batches
from pipeline.models import fixed_shots
from stages.common import model_dir, run, setup, write_json

log = logging.getLogger("export")


def pip_requirements() -> list[str]:
    """What the logged pyfunc needs (serving/mlflow_model.py: its code imports these), pinned to this environment.
    Stated, not inferred: MLflow's inference re-imports the model in a subprocess, 9.8 of the stage's 28 s on
    the 2-core CPU."""
    from importlib import metadata
    found = []
    for dist in ("mlflow", "numpy", "pandas", "pillow", "torch", "torchvision", "opencv-python-headless", "tqdm",
                 "onnx", "onnxruntime-gpu", "onnxruntime"):
        try:
            found.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return found


def log_to_mlflow(cfg, out: Path, onnx_path: Path, example, engine: Path | None, report: dict, fold: int,
                  shots: int):
    import mlflow

    from serving.mlflow_model import log_pyfunc
    lat = report["latency"]
    with tracking.resume_run(cfg, out, "export") as t:
        t.metrics({"onnx_max_rel": report["onnx"]["parity"]["max_rel"],
                   "onnx_latency_ms": lat["onnxruntime"]["median_ms"], "torch_latency_ms": lat["torch"]["median_ms"]})
        t.tags({"latency_busy": lat["onnxruntime"]["busy"] or lat["torch"]["busy"]})
        # registered: images in, masks out (serving/mlflow_model.py; `mlflow models serve` serves it)
        info = log_pyfunc(out, cfg.tracking.registered_model, pip_requirements(), int(example[0].shape[-1]))
        version = getattr(info, "registered_model_version", None)
        if version is not None:
            alias = tracking.model_alias(cfg, fold, shots)
            mlflow.MlflowClient().set_registered_model_alias(cfg.tracking.registered_model, alias, version)
            m = cfg.model
            tracking.describe_model_version(
                cfg, version,
                {"head": m.head, "finetune": m.finetune, "backbone": m.backbone, "benchmark": cfg.data.benchmark,
                 "fold": fold, "shots": shots, "dvc_experiment": tracking.experiment_name(),
                 "onnx_max_rel": f"{report['onnx']['parity']['max_rel']:.3g}",
                 "merge_max_rel": f"{report['merge_max_rel']:.3g}"},
                f"{m.head.upper()} on {m.backbone}, {m.finetune} regime, {cfg.data.benchmark} fold {fold}, trained "
                f"with {shots}-shot episodes. Merged (plain dense convs) and exported to ONNX: parity "
                f"{report['onnx']['parity']['max_rel']:.2g} relative to PyTorch.")
            report["mlflow"] = {"registered_model": cfg.tracking.registered_model, "version": int(version),
                                "alias": alias, "run_id": t.run_id}
        if engine is not None and engine.exists():
            t.artifact(engine, "tensorrt")
        t.artifact(out / "export.json", "export")


def aoti_package(cfg, model, folder: Path, size: int, meta: dict, batches, example) -> dict:
    """aoti/model.pt2 for C++ (export/aoti.py), checked against the model like the ONNX graph."""
    import shutil
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if not cfg.export.aoti:
        return {"built": False, "reason": "export.aoti is false"}
    keep = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items() if k != "class_names"}
    path = aoti.export_aoti(model, folder / "model.pt2", size, keep)
    runner, _ = aoti.load(path)

    class Package:   # check_parity's session interface over the package
        def run(self, _names, feed):
            return [runner(*(torch.from_numpy(feed[n]) for n in onnx_export.INPUTS)).numpy()]
    parity = onnx_export.check_parity(model, Package(), batches, cfg.export.rtol, fail_dir=folder.parent, label="aoti")
    with torch.no_grad():
        lat = onnx_export.latency(lambda: runner(*example))
    return {"built": True, "package": str(path), "bytes": path.stat().st_size, "max_rel": parity["max_rel"],
            "latency": lat}


def int8_decoder(cfg, fold: int, shot: int, out: Path, enc: Path, dec: Path, size: int, shots: list[int]) -> dict:
    """int8/query_decoder.onnx (export/int8.py): calibrated on training episodes, scored against FP32 on the
    evaluation episodes (eval.seeds[0]), kept only within export.int8_max_drop mIoU points."""
    import shutil

    from export import int8
    from pipeline.data.episodes import EpisodeDataset
    folder = out / "int8"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if not cfg.export.int8:
        return {"built": False, "reason": "export.int8 is false"}
    prepared = prepared_dir(cfg.data.root, cfg.data.benchmark)
    splits = split_dir(cfg.data.root, cfg.data.benchmark, fold)
    calib = fixed_batches(prepared, splits / "train.jsonl", size, [shot], 8, seed=1)
    path = int8.quantize_decoder(dec, out / int8.FILE, int8.calibration_feeds(int8.split_runtime(enc, dec), calib))
    ds = EpisodeDataset(prepared, splits / "val.jsonl", shot, "test", size, seed=cfg.eval.seeds[0],
                        episodes=cfg.eval.episodes, protocol=cfg.eval.protocol)
    result = {"built": True, "calibration_batches": len(calib),
              **int8.accuracy(enc, dec, path, ds, fold_classes(cfg, fold)[0])}
    result["kept"] = result["drop"] <= cfg.export.int8_max_drop
    if not result["kept"]:
        path.rename(out / int8.REJECTED)
        logging.getLogger("export").warning("INT8 decoder rejected: mIoU %.2f against FP32 %.2f, a drop of %.2f > "
                                            "export.int8_max_drop %.2f; kept as %s for inspection", result["int8_miou"],
                                            result["fp32_miou"], result["drop"], cfg.export.int8_max_drop,
                                            out / int8.REJECTED)
    bf16 = result["bf16"]
    bf16["kept"] = result["kept"] and bf16.get("drop", float("inf")) <= cfg.export.int8_max_drop
    if bf16["kept"]:
        int8.allow_bf16(path)
    result["file"] = str(out / (int8.FILE if result["kept"] else int8.REJECTED))
    return result


def preview_graphs(cfg, model, fold: int, shot: int, out: Path, meta: dict, shots: list[int], full: tuple) -> dict:
    """preview/: the split graphs at export.preview_size, a smaller working size for interactive use (the answer
    still at the query's full resolution), checked like the others; their mIoU on the evaluation episodes
    (eval.seeds[0]) beside the full size's, and a query's latency at both sizes (ONNX Runtime, this machine)."""
    import shutil

    from export.int8 import AsModel
    from pipeline.data.episodes import EpisodeDataset
    from pipeline.evaluate import evaluate
    folder = out / "preview"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    p = cfg.export.preview_size
    if not p:
        return {"built": False, "reason": "export.preview_size is 0"}
    prepared = prepared_dir(cfg.data.root, cfg.data.benchmark)
    val = split_dir(cfg.data.root, cfg.data.benchmark, fold) / "val.jsonl"
    # auto whatever export.exporter says: the traced graph fails where a pyramid bin does not divide the smaller
    # feature map, and dynamo then exports it
    graphs = onnx_export.export_checked(model, folder, p, cfg.export.opset, {**meta, "input_size": [p, p]},
                                        "auto", fixed_batches(prepared, val, p, shots, 1), cfg.export.rtol)
    (folder / "model.onnx").unlink(missing_ok=True)             # the service reads the split graphs
    result = {"built": True, "size": p, "exporter": graphs["exporter"], "split_parity": graphs["split_parity"]["max_rel"]}
    for name, size, (enc, dec) in (("full", cfg.eval.test_size, full), ("preview", p, (graphs["encoder"],
                                                                                       graphs["decoder"]))):
        runtime = onnx_export.SplitSession(enc, dec, prefer_cuda=False)
        ds = EpisodeDataset(prepared, val, shot, "test", size, seed=cfg.eval.seeds[0], episodes=cfg.eval.episodes,
                            protocol=cfg.eval.protocol)
        acc, _ = evaluate(AsModel(runtime), ds, torch.device("cpu"), desc=f"preview check {name}", progress=False,
                          classes=fold_classes(cfg, fold)[0])
        q = np.zeros((1, 3, size, size), np.float32)
        feats = runtime.encode(np.zeros((1, shot, 3, size, size), np.float32), np.ones((1, shot, size, size), np.float32))
        result[f"{name}_miou"] = round(100 * acc.miou(), 2)
        result[f"{name}_query_ms"] = round(onnx_export.latency(lambda: runtime.decode(q, *feats), runs=3, warmup=1)
                                           ["median_ms"], 1)
    result["miou_cost"] = round(result["full_miou"] - result["preview_miou"], 2)
    result["speedup"] = round(result["full_query_ms"] / result["preview_query_ms"], 2)
    return result


def main():
    args, cfg = setup(__doc__, fold=True)
    out = model_dir(args.fold, args.shot)
    model, mcfg = adapter_io.load_merged(out / "merged.pt")
    size = cfg.eval.test_size
    prepared = prepared_dir(cfg.data.root, cfg.data.benchmark)
    meta = {"format": "svf-fss/1", "head": mcfg.model.head, "backbone": mcfg.model.backbone,
            "finetune": mcfg.model.finetune, "benchmark": cfg.data.benchmark, "fold": args.fold,
            "model_shots": args.shot,
            "class_names": class_names(prepared),
            "novel_classes": fold_classes(cfg, args.fold)[0],
            "input_size": [size, size], "normalisation": {"mean": list(MEAN), "std": list(STD), "scale": 1 / 255},
            "inputs": "query[B,3,S,S], support[B,K,3,S,S], support_mask[B,K,S,S] (1 object, 0 or 255 not)",
            "outputs": "logits[B,2,S,S] (background, object)"}
    merge = json.loads((out / "merge.json").read_text())
    k_fixed = fixed_shots(model)
    shots = [k_fixed] if k_fixed else cfg.export.shots
    if k_fixed:
        meta["shots"] = f"exactly {k_fixed} (the shot count the model was trained with)"
    batches = fixed_batches(prepared, split_dir(cfg.data.root, cfg.data.benchmark, args.fold) / "val.jsonl",
                            size, shots, cfg.export.parity_episodes)
    graphs = onnx_export.export_checked(model, out, size, cfg.export.opset, meta, cfg.export.exporter, batches,
                                        cfg.export.rtol)
    onnx_path, sess, parity = graphs["path"], graphs["session"], graphs["parity"]
    enc, dec, split_parity = graphs["encoder"], graphs["decoder"], graphs["split_parity"]
    q, s, m = batches[0]
    with torch.no_grad():
        lat_torch = onnx_export.latency(lambda: model(q, s, m))
    feed = {"query": q.numpy(), "support": s.numpy(), "support_mask": m.numpy()}
    lat_ort = onnx_export.latency(lambda: sess.run(None, feed))
    report = {"fold": args.fold, "model_shots": args.shot, "merge_max_rel": merge["max_rel"],
              "onnx": {"file": str(onnx_path), "bytes": onnx_path.stat().st_size, "opset": cfg.export.opset,
                       "exporter": graphs["exporter"], **({"fallback": graphs["fallback"]} if "fallback" in graphs else {}),
                       "providers": sess.get_providers(), "dynamic_axes": "batch" if k_fixed else "batch, shots", "parity": parity,
                       "split_graphs": {"support_encoder": str(enc), "query_decoder": str(dec),
                                        "parity": split_parity,
                                        **({"openvino_parity": graphs["openvino_parity"]}
                                           if "openvino_parity" in graphs else {})}},
              "latency": {"batch": int(q.shape[0]), "shots": int(s.shape[1]), "torch": lat_torch,
                          "onnxruntime": lat_ort}}
    report["aoti"] = aoti_package(cfg, model, out / "aoti", size, meta, batches, (q, s, m))
    report["int8"] = int8_decoder(cfg, args.fold, args.shot, out, enc, dec, size, shots)
    report["preview"] = preview_graphs(cfg, model, args.fold, args.shot, out, meta, shots, (enc, dec))
    engine = None
    reason = tensorrt_engine.unavailable_reason()
    if reason is None:
        engine = out / "model.engine"
        info = tensorrt_engine.build_engine(onnx_path, engine, size, cfg.export.max_batch, max(shots),
                                            cfg.export.fp16, timing_cache=out / "timing.cache", min_shots=min(shots))
        runner = tensorrt_engine.TRTRunner(engine)
        worst = 0.0
        for bq, bs, bm in batches:
            ref = sess.run(None, {"query": bq.numpy(), "support": bs.numpy(), "support_mask": bm.numpy()})[0]
            got = runner(bq, bs, bm).cpu().numpy()
            worst = max(worst, onnx_export.rel_error(got, ref))
        tol = 2e-2 if "fp16" in info["precision"] else 1e-3
        if worst > tol:
            raise onnx_export.ParityError(f"TensorRT engine differs from ONNX Runtime: relative error {worst:.3g} > {tol}")
        report["tensorrt"] = {"built": True, "engine": str(engine), **info, "parity_vs_onnxruntime": worst,
                              "tolerance": tol,
                              "latency": onnx_export.latency(lambda: runner(q, s, m), sync=torch.cuda.synchronize)}
    else:
        report["tensorrt"] = {"built": False, "reason": reason}
        log.info("no TensorRT engine: %s", reason)
    report["triton"] = [str(p) for p in triton.write_repository(out / "triton", out, size, engine,
                                                                     k_fixed or -1)]
    write_json(out / "export.json", report)
    log_to_mlflow(cfg, out, onnx_path, (q, s, m), engine, report, args.fold, args.shot)
    write_json(out / "export.json", report)
    print(f"export fold {args.fold}, {args.shot}-shot model: {onnx_path} (parity max rel {parity['max_rel']:.2e} "
          f"<= {cfg.export.rtol:g}; "
          f"torch {lat_torch['median_ms']:.1f} ms, ONNX Runtime {lat_ort['median_ms']:.1f} ms per episode), "
          f"AOTInductor: {'built ' + report['aoti']['package'] if report['aoti']['built'] else 'not built'}, "
          f"TensorRT: {'built ' + str(engine) if engine else 'not built (' + reason + ')'}; "
          f"Triton repository {out / 'triton'}")


if __name__ == "__main__":
    run(main)
