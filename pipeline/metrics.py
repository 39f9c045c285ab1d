"""Training metrics to the console, `log.jsonl` (appending across resumes) and TensorBoard. Rank 0 only."""
from __future__ import annotations

import json
import logging
import os
import time

log = logging.getLogger("pipeline")

# Dense bf16 peak TFLOPs per GPU, for MFU (of every run, whatever its precision). First match in
# torch.cuda.get_device_name() wins, so the PCIe/NVL parts come before their SXM namesakes. `log.peak_tflops` overrides.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "A100": 312.0, "H100": 989.0,
               "H200": 989.0, "B200": 2250.0}


def peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


class Metrics:
    def __init__(self, jsonl: str | None, tensorboard_dir: str | None, enabled: bool,
                 wandb_project: str | None = None, run_config: dict | None = None):
        self.enabled = enabled
        self.started = False  # the first line this process writes says "start": a restart, for pipeline.report
        self.jsonl = None
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        if wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, config=run_config, resume="allow")
        if jsonl:
            os.makedirs(os.path.dirname(os.path.abspath(jsonl)), exist_ok=True)
            self.jsonl = open(jsonl, "a", buffering=1)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self.jsonl:
            line = {**record, "time": round(time.time(), 3)}  # wall clock: restarts' gaps, time lost
            if not self.started:
                line["start"], self.started = True, True
            self.jsonl.write(json.dumps(line) + "\n")
        if self.tb:
            prefix = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "split"):
                    self.tb.add_scalar(f"{prefix}/{k}", v, record["step"])
        if self.wandb:
            prefix = record.get("split", "train")
            self.wandb.log({f"{prefix}/{k}": v for k, v in record.items() if isinstance(v, (int, float))
                            and k not in ("step", "split")}, step=record["step"])
        if record.get("split") == "valid":
            log.info("step %d | valid loss %.4f | ppl %.2f", record["step"], record["loss"], record["ppl"])
        else:
            mfu = f"{100 * record['mfu']:.1f}%" if record.get("mfu") is not None else "n/a"
            log.info("step %d | loss %.4f | lr %.3e | grad norm %.3f | %.0f tok/s | %.2f TFLOPs | MFU %s | mem %.0f MB",
                     record["step"], record["loss"], record["lr"], record["grad_norm"] or 0.0,
                     record["tokens_per_sec"], record["tflops"], mfu, record.get("mem_mb", 0.0))

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
