"""The reference-distribution study: the paper's Tables 1 and 2 at CPU scale, with seeds.

``dmvae study`` (or ``python -m dmvae_lightning.study``, ``make study``) runs a grid of *arms*
through the same stages with the same budgets on Fashion-MNIST and writes a table with mean +- std
over generator seeds. Each arm is one YAML file under ``configs/fashion_mnist/study/`` (add a file
to add an arm)::

    title: "DMVAE: supervised-feature reference"   # row name
    table: 1                                       # 1: reference study, 2: ablations
    order: 30                                      # row order within the table
    reference: supervised                          # the reference it aligns to (REFERENCES)
    ablation: ablation                             # arm whose latents are its "no matching" control
    tokenizer:                                     # stages after the reference's stage-1 tokenizer
      - config: align.yaml                         # a configs/fashion_mnist/ file ...
        overlay: {model: {init_args: {matching_weight: 10.0}}}   # ... and what the arm changes
      - config: finetune.yaml
    generator: {}                                  # overlay of configs/fashion_mnist/diffusion.yaml

``tokenizer: []`` means the reference's stage-1 tokenizer itself; a first stage with ``from:
scratch`` trains a tokenizer from nothing (the KL-VAE rows). Every stage is ``dmvae fit`` on the
named config with the arm's overlay and the paths the driver fills in (``init_from`` = the previous
stage, ``real_model`` = the reference's score model, encoder weights, log and checkpoint dirs).

Two shorthands keep variants to a few lines: ``extends: <arm>`` takes that arm file's keys and
replaces the ones given; ``tokenizer_seed: N`` sets the model and data seeds of every tokenizer
stage (an alignment seed). See :class:`~dmvae_lightning.study.arms.Arm`.

Shared stages (the classifier, the FID net, the self-supervised encoder, the stage-1 tokenizers and
the reference score models of :data:`REFERENCES`) are trained once and reused by every arm that
needs them; so are an arm's own tokenizer stages that another arm begins with in the same way
(same reference, configs, overlays and seeds:
:meth:`~dmvae_lightning.study.arms.Arm.stage_fingerprint`): they are copied, not retrained, so a
longer fine-tune is one more stage on an existing arm. Finished stages are skipped (a stage killed after an epoch-end save resumes from it)
and finished arms (and generator seeds) are read back from their JSON files, so a killed study
resumes where it stopped. ``--jobs N`` runs
the shared stages, the arms' tokenizers and the generator seeds as up to N worker processes at
once, each after what it needs (:mod:`~dmvae_lightning.study.parallel`; stages are built under
lock files, so each is built once).

Per arm, on held-out Fashion-MNIST test images: PSNR and rFID of the final tokenizer; the distance
(RBF MMD^2, sliced W2^2) between its latents and its reference's samples in the reference model's
normalised space (and the same for the arm named by ``ablation``); a linear probe's test accuracy
on the latents (semantic content); then, for every seed, a generator DiT trained on the cached
latents of the training set, and its gFID and Inception-style score with the domain FID net on
class-balanced samples, and its flow-matching loss on the test latents (fixed t grid and noise).

The package: :mod:`~dmvae_lightning.study.arms` (arm files, shared stages, references, budgets),
:mod:`~dmvae_lightning.study.driver` (:class:`Study`: stages and evaluation),
:mod:`~dmvae_lightning.study.evaluation` (tensor-level helpers, shared with ``make demo``),
:mod:`~dmvae_lightning.study.report` (tables and figures), :mod:`~dmvae_lightning.study.parallel`
(worker processes for ``--jobs``), :mod:`~dmvae_lightning.study.cli`,
:mod:`~dmvae_lightning.study.publish` (the docs' tables from a runs folder) and
:mod:`~dmvae_lightning.study.compare` (the study's rule, better by more than twice the larger
seed std, for any two groups of arms).

Outputs under ``--runs`` (default ``runs/study``): ``study.md``, ``study.json``, ``figures/``
(gFID per arm with error bars, PSNR vs gFID, latent PCA per arm), TensorBoard runs under ``tb/``
(every stage, and a ``summary`` run with the per-arm scalars and the figures), per-arm folders.
A generator budget other than the default (``--generator_steps``) names its files apart
(``generator_steps<N>_seed<s>.json``, ``result_steps<N>.json``, ``study_steps<N>.md``,
``figures_steps<N>/``; :func:`~dmvae_lightning.study.arms.budget_suffix`), so budgets share one
runs folder and train only generators on the tokenizers and caches already there.
"""

from dmvae_lightning.study.arms import (
    ARMS_DIR,
    CONFIGS,
    DEFAULT_GENERATOR_STEPS,
    DEFAULT_SEEDS,
    REFERENCES,
    SHARED,
    SOURCES,
    Arm,
    Reference,
    SharedStage,
    budget_suffix,
    load_arms,
    load_overlay,
)
from dmvae_lightning.study.cli import main
from dmvae_lightning.study.driver import Study
from dmvae_lightning.study.evaluation import flow_matching_loss, latent_distances, linear_probe
from dmvae_lightning.study.report import study_markdown, summarize

__all__ = [
    "ARMS_DIR",
    "CONFIGS",
    "DEFAULT_GENERATOR_STEPS",
    "DEFAULT_SEEDS",
    "REFERENCES",
    "SHARED",
    "SOURCES",
    "Arm",
    "Reference",
    "SharedStage",
    "Study",
    "budget_suffix",
    "flow_matching_loss",
    "latent_distances",
    "linear_probe",
    "load_arms",
    "load_overlay",
    "main",
    "study_markdown",
    "summarize",
]
