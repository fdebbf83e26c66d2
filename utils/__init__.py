"""Companion package of *Rearchitecting LLMs*: the helpers every notebook imports.

Notebooks import the module a call belongs to, so the reader sees where each call comes from, and keep the
plumbing (loading, data, results, the profile) at the top level::

    import utils
    from utils import depth, evaluation

    model, tokenizer = utils.load_model("Qwen/Qwen3-0.6B")
    pruned = depth.prune_depth(model, 4, calibration)
    print(evaluation.perplexity(pruned, held_out))

The modules, in layers (utils/README.md has the map and the chapter of each module):

0. :mod:`~utils.profiles` (run profiles), :mod:`~utils.precision` (the precision-and-device policy: load dtype,
   autocast, loss scaling, ``device_of``/``to_device``; ``RLLM_HARDWARE=t4`` simulates a Colab T4),
   :mod:`~utils.architectures` (the course models' published shapes), :mod:`~utils.checks` (tolerances per dtype),
   :mod:`~utils.results` (saving a notebook's results).
1. :mod:`~utils.structure` (where a model keeps its blocks, norms and text config), :mod:`~utils.models`
   (loading in every profile), :mod:`~utils.hub` (Hub access), :mod:`~utils.data` (datasets, validators,
   dataloaders).
2. :mod:`~utils.evaluation` (size, perplexity, calibration passes), :mod:`~utils.speed` (timing models fairly),
   :mod:`~utils.training` (the one training loop), :mod:`~utils.plots`, :mod:`~utils.anatomy` (parameter and
   KV-cache arithmetic, CH03), :mod:`~utils.kv_cache` (building and measuring caches, CH08).
3. Techniques: :mod:`~utils.depth` (CH04), :mod:`~utils.width` (CH05), :mod:`~utils.distillation` (CH02, CH06),
   :mod:`~utils.lora` and :mod:`~utils.quantization` and :mod:`~utils.extraction` (CH07), :mod:`~utils.attention`
   (CH08: attention sublayers, decode FLOPs), :mod:`~utils.bypass` (CH08: Adaptive Attention Bypass),
   :mod:`~utils.bypass_router` (CH08: a router for the bypass, learned from what skipping costs),
   :mod:`~utils.moe` (CH09),
   :mod:`~utils.activations` (CH10), :mod:`~utils.bias` (CH11), :mod:`~utils.benchmarks` (Appendix B),
   :mod:`~utils.energy` (Appendix C), :mod:`~utils.publish` (a model folder with its model card, pushed to the
   Hub on request: CH06_NB03).

The names below are also re-exported at the top level, as earlier versions of the course used them.
"""

from . import bypass, kv_cache, precision, speed, structure
from .anatomy import kv_bytes, kv_cache_bytes, kv_cache_bytes_per_token, parameter_breakdown
from .architectures import ARCHITECTURES, ArchSpec, build_on_meta, get_spec, real_config, tiny_config
from .attention import (
    apply_recorded_surgery,
    attention_importance,
    choose_attention_to_remove,
    decode_flops_per_token,
    ideal_decode_speedup,
    measure_decode,
    mlp_importance,
    realised_share,
    remove_attention,
    removed_attention,
    sublayer_importance,
)
from .bypass import attention_bypass, calibrate_threshold, prompt_attention_scores
from .checks import tolerances
from .data import DATASETS, batch_tensors, load_records, load_texts, make_dataloader
from .depth import (
    block_importance,
    choose_blocks_to_remove,
    fold_linear_replacements,
    linear_replacements,
    prune_depth,
    remove_blocks,
)
from .distillation import (
    distill,
    distillation_loss,
    kept_blocks,
    make_layer_map,
    plot_history,
    recovered_share,
    retention,
    texts_for_retention,
)
from .evaluation import count_parameters, perplexity
from .extraction import (
    check_schema,
    generate_answers,
    make_sft_dataloader,
    parse_json_answer,
    score_extraction,
)
from .hub import check_model_access  # before a gated model's first load (full profile)
from .kv_cache import cache_bytes, kv_bytes_per_token, make_cache, perplexity_through_cache
from .models import (
    CPU_MODEL_ID,
    GatedModelError,
    HubUnreachableError,
    ModelAccessError,
    OfflineModelMissing,
    load_model,
    load_tokenizer,
    register_config_surgery,
)
from .plots import plot_comparison, plot_layer_scores, plot_stacked
from .precision import device_of, precision_policy, to_device
from .profiles import budget, describe_profile, get_profile, runs_dir
from .results import environment, load_results, save_results
from .speed import (
    SPEED_VERDICTS,
    compare_forward,
    compare_speed,
    ideal_speedup,
    matmul_parameters,
    measure_forward,
    measure_generation,
    speed_conclusion,
    speed_ratios,
    time_alternately,
)
from .training import causal_lm_loss, train
from .width import (
    activation_grams,
    activation_norms,
    compensate_down_proj,
    glu_mlps,
    kept_indices,
    neuron_importance,
    prune_glu,
    remove_neurons,
    scores_from_activations,
    target_width,
)

# isort: split
# CH11: bias neurons and Fair Pruning
from .bias import (
    AXES,
    WeightEdit,
    activation_bias,
    bbq_scores,
    bootstrap_ci,
    count_neurons,
    fair_prune,
    fairness_scores,
    final_state_bias,
    lm_eval_predictions,
    load_bias_benchmark,
    load_bias_pairs,
    load_bias_probes,
    mlp_activations,
    next_token_divergence,
    pair_differences,
    random_neurons,
    relative_bias_scores,
    scale_neurons,
    signed_bias_scores,
    top_neurons,
    zero_neurons,
)

# isort: split
# CH07: low-rank adapters and quantisation from scratch
from .lora import (
    LoRALinear,
    adapter_size_bytes,
    apply_lora,
    find_target_modules,
    lora_parameter_count,
    merge_lora,
    train_lora_adapter,
)
from .quantization import (
    QuantizedTensor,
    bits_per_parameter,
    bitsandbytes_levels,
    dequantize_blockwise,
    fake_quantize_model,
    fp4_levels,
    int_levels,
    nf4_levels,
    quantization_error,
    quantization_levels,
    quantize_blockwise,
)

# isort: split
# CH10: looking inside a model (activations, residual stream, logit lens)
from .activations import (
    CAPTURE_POINTS,
    attention_to_first_token,
    bin_neurons,
    capture_activations,
    find_massive,
    glu_statistics,
    lens_top_tokens,
    logit_lens,
    optipfair_captures,
    patch_residual,
    residual_stream,
    trace_writers,
)
from .plots import explore, plot_heatmap, plot_logit_lens, widgets_available

# isort: split
# Appendices: benchmark evaluation with lm-eval (APPB) and energy per token (APPC)
from .benchmarks import (
    benchmark_tasks,
    compare_models,
    comparison_table,
    lm_eval_available,
    local_task,
    mc_metrics,
    mc_prompt,
    paired_comparison,
    paired_difference,
    run_lm_eval,
    score_choices,
)
from .energy import EnergyMeter, energy_sources, idle_baseline, measure_energy, token_costs

# isort: split
# CH09: mixture of experts from a dense model
from . import moe
from .moe import (
    GLUMoE,
    active_parameters,
    calibrate_temperature,
    fit_routers,
    load_balancing_loss,
    moefy,
    partition_neurons,
    routing_stats,
    save_moe,
    set_routing,
    set_top_k,
    to_qwen2_moe,
    upcycle,
)

# isort: split
# CH06_NB03: a model folder with its model card (and a push to the Hub, only when asked)
from . import publish, specialist
from .publish import read_card, save_with_card
