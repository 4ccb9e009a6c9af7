"""Evaluation of pretrained video backbones: frozen features (kNN, linear probe), the papers' clip-level
protocols (``protocols.py``, run by ``finetune.py``), attention maps and the results table.
``evaluate.py`` is the command line over these pieces (``cli.py``).

Each protocol's typed config lives beside its code and is built by ``common.typed_config``; settings of
the data area are its sections, embedded rather than copied: ``ExtractConfig.data`` is a
``pipelines.DataConfig``, ``FinetuneConfig.eval`` a ``pipelines.config.EvalConfig``."""
