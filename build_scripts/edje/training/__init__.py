"""Training EDJE: the embedded default on the synthetic world, or fine-tuning a model source.

The command line is :mod:`edje.train`. Two stages (DESIGN.md §2, §6), in the order they run:

1. **First stage** (default only, :mod:`.first_stage`): a small transformers ``SiglipModel``
   with the sigmoid loss and two per-patch auxiliary losses. Its vision tower becomes EDJE's
   frozen ViT, its text tower the first-stage text search.
2. **EDJE** (adapter + joint encoder + head + ``text_projection``) on the frozen ViT's
   cached patch features: the adapter is started (:mod:`.adapter_init`), then
   :class:`~.trainer.EDJETrainer` draws batches (:mod:`.negatives`), computes the losses
   (:mod:`.losses`, :mod:`.grounding`) and follows the schedules (:mod:`.schedule`),
   validating now and then (:mod:`.evaluation`).

Modules:

* :mod:`.recipe`: ``Recipe`` and ``StageTwo``, every number the result depends on;
* :mod:`.data`: pair data with groups, the world's splits, Karpathy datasets, tokenization,
  the frozen ViT's feature cache;
* :mod:`.first_stage`, :mod:`.adapter_init`, :mod:`.negatives`, :mod:`.losses`,
  :mod:`.grounding`, :mod:`.schedule`, :mod:`.trainer`: as above;
* :mod:`.evaluation`: score matrices with torch, reports by :mod:`edje_client.evaluation`;
* :mod:`.embedded_default`: the whole default run, world to saved model source and report;
* :mod:`.finetune`: stage two alone on a model source and a Karpathy dataset;
* :mod:`.record`: the ``TRAINING.md`` and ``training.json`` written beside the weights.
"""
