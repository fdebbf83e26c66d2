"""Companion package of *Rearchitecting LLMs*: the helpers every notebook imports.

    from utils import load_model, load_texts, make_dataloader, perplexity

Modules: :mod:`~utils.profiles` (run profiles), :mod:`~utils.architectures` (the course
models' published shapes), :mod:`~utils.models` (loading), :mod:`~utils.data` (datasets and
dataloaders), :mod:`~utils.evaluation` (size, perplexity, speed), :mod:`~utils.plots`
(charts), :mod:`~utils.anatomy` (parameter breakdowns and KV-cache arithmetic, CH03),
:mod:`~utils.extraction` (the clinical-notes extraction task: schema, prompts, scorer; CH07),
:mod:`~utils.results` (saving a notebook's results), :mod:`~utils.training` (the one training
loop every chapter that trains shares), and the technique helpers: :mod:`~utils.depth` (CH04),
:mod:`~utils.width` (CH05), :mod:`~utils.distillation` (CH02, CH06).
"""

from .anatomy import kv_cache_bytes, kv_cache_bytes_per_token, parameter_breakdown
from .architectures import ARCHITECTURES, ArchSpec, build_on_meta, get_spec, real_config, tiny_config
from .data import DATASETS, batch_tensors, load_records, load_texts, make_dataloader
from .depth import block_importance, choose_blocks_to_remove, remove_blocks
from .distillation import distill, distillation_loss, kept_blocks, make_layer_map, plot_history, recovered_share
from .evaluation import (
    compare_forward,
    count_parameters,
    ideal_speedup,
    matmul_parameters,
    measure_forward,
    measure_generation,
    perplexity,
    speed_ratios,
)
from .extraction import (
    check_schema,
    generate_answers,
    make_sft_dataloader,
    parse_json_answer,
    score_extraction,
)
from .models import CPU_MODEL_ID, OfflineModelMissing, load_model, load_tokenizer
from .plots import plot_comparison, plot_layer_scores, plot_stacked
from .profiles import budget, describe_profile, get_profile, runs_dir
from .results import save_results
from .training import causal_lm_loss, train
from .width import (
    activation_grams,
    activation_norms,
    compensate_down_proj,
    glu_mlps,
    kept_indices,
    neuron_importance,
    prune_glu,
    scores_from_activations,
    target_width,
)
