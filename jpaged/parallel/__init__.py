"""Parallelism: the column/row-parallel layers models are built from (`layers`), meshes and
parameter placement (`mesh`), data-parallel replicas (`replicas`) and one engine over
several processes (`distributed`). Each module is imported on its own: `layers` sits below
the models, the others above the engine."""
