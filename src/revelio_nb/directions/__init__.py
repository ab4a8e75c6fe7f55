"""Decoding Diffusion (METHODS.md §2): natural-language directions in h-space, with no training.

h is the output of the bottleneck block (``mid_block``; a transformer's middle block) captured while sampling;
"latent" in this package means an SAE unit only. Modules, in import order (each imports only those above it):

* :mod:`.prompt_runs`: :class:`SampleConfig`, :func:`generate` (prompts sampled with paired seeds through
  :mod:`revelio_nb.sampling`, h handed to a callback), :func:`prompt_h` -> :class:`PromptH` (one h per prompt,
  cached runs), :func:`text_encoder_embeddings` (the text-encoder baseline);
* :mod:`.word_maps`: caption word maps (:func:`fit_word_map`, :class:`WordMap`), naming directions and SAE latents
  with words (:meth:`WordMap.name`, :func:`name_sae_latents`), :func:`caption_features`, :func:`pca_directions`;
* :mod:`.axes`: directions from words: :func:`concept_direction`, :func:`attribute_axis`, :func:`word_axis`,
  :func:`mirror_axis`;
* :mod:`.bias`: bias scores, rho against the ground truth, bootstrap intervals over seed sets, the retrieval check,
  what the prompts draw;
* :mod:`.causal`: :class:`SteeringHook`, :class:`SteeringHooks`, :func:`steer`, :func:`steer_attributes`,
  :func:`steering_effect`;
* :mod:`.plots`: notebook 06's figures;
* :mod:`.study`: :func:`bias_study`, the pipeline notebook 06 runs, and its tables (:func:`summary_table`);
* :mod:`.samplers`: DDIM vs the latent-consistency sampler in the bias study (LCM configs, side-by-side table).
* :mod:`.readouts`: notebook 06's other steps around the study (attribute prompts, score tables, clusters,
  words naming directions and SAE latents, steering strip panels);
* :mod:`.steering_blocks`: :func:`steer_by_block`, where each attribute is steered (h first, a later block only
  where h does not move it, chosen on selection seeds and measured on evaluation seeds).
"""

from .prompt_runs import (H_CONDITIONS, PromptH, SampleConfig, generate, prompt_h, step_index,
                          step_timesteps, text_encoder_embeddings)
from .word_maps import (CONDITIONS, DEFAULT_STOPWORDS, WORD_METHODS, CaptionMapConfig, WordMap, caption_features,
                        caption_words, fit_word_map, name_sae_latents, pca_directions, word_matrix)
from .axes import (attribute_axes_by_step, attribute_axis, attribute_prompts, concept_direction, mirror_axis,
                   word_axis)
from .bias import (CENTRES, SCORE_METHODS, bias_scores, bootstrap_rho, caption_axis_bias, caption_axis_projections,
                   caption_retrieval, cluster_prompts, combine_steps, compare_with_ground_truth,
                   generated_attribute_scores, prompt_following, rho_by_seed_set, score_table, scores_frame,
                   stepwise_rho, truth_matrix)
from .causal import STEER_AXES, SteeringHook, SteeringHooks, steer, steer_attributes, steering, steering_effect
from .plots import (plot_bias_heatmaps, plot_dendrogram, plot_prompt_samples, plot_retrieval, plot_rho_intervals,
                    plot_steering_effect, plot_steering_strips, plot_stepwise_rho, plot_word_bars)
from .study import (BiasStudy, BiasStudyConfig, bias_study, config_dict, readout_variants, steering_summary,
                    steps_of, summary_table)
from .readouts import (attribute_prompt_h, bias_panels, named_directions, naming_vs_kind, neutral_clusters,
                       ranking_table, readout_table, sae_latent_words, short_prompt, stack_scores, strip_panels)
from .samplers import lcm_study_config, replicate_studies, sampler_comparison, snap_timesteps
from .steering_blocks import SteerConfig, SteeringResult, steer_by_block

__all__ = [
    # prompt_runs
    "H_CONDITIONS", "SampleConfig", "generate", "PromptH", "prompt_h", "step_index", "step_timesteps",
    "text_encoder_embeddings",
    # word_maps
    "CONDITIONS", "DEFAULT_STOPWORDS", "WORD_METHODS", "CaptionMapConfig", "WordMap", "caption_features",
    "caption_words", "fit_word_map", "name_sae_latents", "pca_directions", "word_matrix",
    # axes
    "attribute_axes_by_step", "attribute_axis", "attribute_prompts", "concept_direction", "mirror_axis", "word_axis",
    # bias
    "CENTRES", "SCORE_METHODS", "bias_scores", "bootstrap_rho", "caption_axis_bias", "caption_axis_projections",
    "caption_retrieval", "cluster_prompts", "combine_steps", "compare_with_ground_truth",
    "generated_attribute_scores", "prompt_following", "rho_by_seed_set", "score_table", "scores_frame",
    "stepwise_rho", "truth_matrix",
    # causal
    "STEER_AXES", "SteeringHook", "SteeringHooks", "steer", "steer_attributes", "steering", "steering_effect",
    # plots
    "plot_bias_heatmaps", "plot_dendrogram", "plot_prompt_samples", "plot_retrieval", "plot_rho_intervals",
    "plot_steering_effect", "plot_steering_strips", "plot_stepwise_rho", "plot_word_bars",
    # study
    "BiasStudy", "BiasStudyConfig", "bias_study", "config_dict", "readout_variants", "steering_summary", "steps_of",
    "summary_table",
    # readouts
    "attribute_prompt_h", "bias_panels", "named_directions", "naming_vs_kind", "neutral_clusters", "ranking_table", "readout_table",
    "sae_latent_words", "short_prompt", "stack_scores", "strip_panels",
    # samplers
    "lcm_study_config", "replicate_studies", "sampler_comparison", "snap_timesteps",
    # steering_blocks
    "SteerConfig", "SteeringResult", "steer_by_block",
]
