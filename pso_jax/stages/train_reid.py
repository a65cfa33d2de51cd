"""Stage `train_reid`: the re-identification embedder, its threshold tau, and its verification AUC.

Trained with a supervised contrastive loss on batches of P patients x K scans from the TRAIN
split; tau calibrated on every pair of VAL images (patients unseen in training); AUC, TPR and FPR
at tau reported on VAL and on TEST pairs (held-out patients, untouched by the calibration)
(`privacy.reid_training`). Writes `reid/checkpoint` (orbax), `reid/reid.json`,
`reid/metrics.jsonl`, then `reid/COMPLETE`.
"""

from pso_jax import stages
from pso_jax.privacy import reid_training


def run(config, workdir: str, **_) -> dict:
  finished = stages.done(workdir, "train_reid")
  if finished is not None:
    return finished
  return reid_training.train_and_write(config, reid_training.load_splits(workdir),
                                       stages.output_dir(workdir, "train_reid"))
