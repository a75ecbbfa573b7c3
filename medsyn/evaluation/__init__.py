"""Measuring generated chest CTs: clinical measures, distribution distances, memorization, prompt control.

- measures.py: per-volume measures from the CT (re-segmented) and from any generated masks
  (pleural effusion, cardiothoracic ratio, %LAA-950, lung/lobe/airway/vessel volumes, nodules,
  mask-CT consistency); thorax.py segments what the measures need from the CT alone.
- features.py: 3D (MedicalNet-style ResNet) and 2.5D slice features, FID and MMD on them.
- audit.py: the memorization audit (nearest training volume vs held-out-to-train distances).
- volumes.py: finding and reading volumes in sample folders, phantom folders, caches and manifests.
- evaluate.py, report.py: `medsyn evaluate` (metrics.json, report.md, plots).
- controllability.py: `medsyn controllability` (prompt pairs, shared seeds, t-tests).
"""
