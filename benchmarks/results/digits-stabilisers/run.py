"""The quickstart problem (digits, SimulatedVLM 3 templates x 1 per class, MLP, 40 epochs) with
Co-Reg's opt-in stabilisers: does keeping the annotator's information in the targets help or hurt
where paper Co-Reg already wins?  Usage: python run.py SEED [key=value ...]"""
import json, sys, time

import yaml
from coreg_ray.coreg.trainer import CoReg
from coreg_ray.data import SimulatedVLM, load_image_table
from coreg_ray.quickstart import quickstart_config

seed, extra = int(sys.argv[1]), sys.argv[2:]
train, test = load_image_table("digits:train"), load_image_table("digits:test")
vlm = SimulatedVLM(n_templates=3, per_class=1, feature_fraction=0.5, seed=seed)
vlm.fit(train.images, train.labels, train.num_classes)
ann = vlm.annotate(train.images, train.ids)
cfg = quickstart_config(None, seed)
cfg.tracking.mlflow = False
for kv in extra:
    key, raw = kv.split("=", 1)
    cfg.set(key, yaml.safe_load(raw))
t0 = time.time()
out = CoReg(cfg, progress=False).fit(train, ann, test)
print(json.dumps({"seed": seed, "extra": extra, "acc": out["test_accuracy"], "s": round(time.time() - t0)}))
