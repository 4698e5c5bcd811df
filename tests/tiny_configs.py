"""Config fields of tiny models whose architectures need more than the common size fields: given to the config's
constructor, beside vocab_size, hidden_size 32, 2 layers, 4 heads and head_dim 8."""

#: DeepSeek-style latent attention (as many key/value heads as query heads).
MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, qk_head_dim=16,
           n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
           num_key_value_heads=4)
#: Gated DeltaNet layers beside attention (Qwen3-Next, Qwen3.5).
DELTANET = dict(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], linear_key_head_dim=8,
                linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4)


def gemma_layers(vocab: int) -> dict:
    """Gemma 3n / 4 layers over a vocabulary of ``vocab``: one sliding-window and one global."""
    return dict(layer_types=["sliding_attention", "full_attention"], sliding_window=4, vocab_size_per_layer_input=vocab,
                num_kv_shared_layers=0)


def gemma4(vocab: int) -> dict:
    """A Gemma 4 text model softcapped at 3 (logits of a few units feel it)."""
    return dict(gemma_layers(vocab), final_logit_softcapping=3.0, hidden_size_per_layer_input=0, global_head_dim=8)


def gemma3_vision(vocab: int) -> dict:
    """A Gemma 3 vision-language config's tiny SigLIP tower (two 14-pixel patches a side, pooled to 4 image
    tokens), its image tokens the last ids of a vocabulary of ``vocab``."""
    return dict(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14),
                mm_tokens_per_image=4, image_token_id=vocab - 1, boi_token_index=vocab - 2, eoi_token_index=vocab - 3)


#: Multimodal rotary sections for a head_dim of 8 (Qwen2-VL and Qwen2.5-VL text configs).
MROPE = dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 1, 1]))
#: Multimodal rotary sections of GLM-4.5V's half-rotary heads of 8.
GLM_MROPE = dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5,
                                      mrope_section=[1, 1, 0]))
#: A tiny SigLIP or CLIP vision tower (two 14-pixel patches a side).
SIGLIP = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
#: Tiny vision towers of vision-language models -> (their config fields, fields of their text config): one layer of
#: 16 hidden units, projected to the text model's 32.
VISION = {
    "qwen2_vl": (dict(vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                                         spatial_merge_size=2, temporal_patch_size=2)), MROPE),
    "qwen2_5_vl": (dict(vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                                           out_hidden_size=32, patch_size=14, spatial_merge_size=2,
                                           temporal_patch_size=2, fullatt_block_indexes=[0])), MROPE),
    **{arch: (dict(vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                                      num_position_embeddings=16, deepstack_visual_indexes=deepstack)), text)
       for arch, deepstack, text in (("qwen3_vl", [0], {}), ("qwen3_vl_moe", [0], {}), ("qwen3_5", [], DELTANET),
                                     ("qwen3_5_moe", [], DELTANET))},
    "mistral3": (dict(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, head_dim=8, image_size=32, patch_size=16)), {}),
    **{arch: (dict(vision_config=SIGLIP, **extra), {}) for arch, extra in (
        ("llava", {}), ("llava_next", {}), ("llava_onevision", {}), ("idefics3", dict(scale_factor=1)),
        ("smolvlm", dict(scale_factor=1)), ("paligemma", {}), ("aya_vision", {}), ("cohere2_vision", {}),
        ("vipllava", dict(vision_feature_layers=[-1, 0])), ("llava_next_video", {}), ("video_llava", {}),
        ("idefics2", dict(perceiver_config=dict(hidden_size=32, resampler_n_latents=4, resampler_depth=1,
                                                resampler_n_heads=2, resampler_head_dim=8, num_key_value_heads=2))),
        ("aria", dict(projector_patch_to_query_dict={4: 4})), ("deepseek_vl", {}))},
    **{arch: (dict(vision_config=dict(SIGLIP, **extra)), {}) for arch, extra in (
        ("lighton_ocr", dict(head_dim=8)), ("ovis2", dict(vocab_size=64)))},
    "fuyu": ({}, {}),  # its image patches go through one linear layer
    "got_ocr2": (dict(vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                                         patch_size=14)), {}),
    "granite_docling": (dict(vision_config=dict(SIGLIP, out_hidden_size=32, deepstack_visual_indexes=[0])), {}),
    "glm_ocr": (dict(vision_config=dict(hidden_size=16, intermediate_size=32, depth=1, num_heads=2, image_size=28,
                                        patch_size=14, out_hidden_size=32, spatial_merge_size=2,
                                        temporal_patch_size=2)), GLM_MROPE),
    "paddleocr_vl": (dict(vision_config=dict(SIGLIP, spatial_merge_size=2)), MROPE),
    # Kimi K2.5: a DeepSeek-V3 language model (latent attention, routed experts)
    "kimi_k25": (dict(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, patch_size=14)), MLA),
    **{arch: (dict(vision_config=dict(hidden_size=16, intermediate_size=32, depth=1, num_heads=2, patch_size=14,
                                      out_hidden_size=32, spatial_merge_size=2, **extra)), {})
       for arch, extra in (("llava_onevision1_5", {}),)},
    # Llama 3.2 Vision: one global layer in its tower, one cross-attention layer in its text model
    "mllama": (dict(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_global_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14,
                                       intermediate_layers_indices=[0], vision_output_dim=32)),
               dict(cross_attention_layers=[1])),
    "internvl": (dict(vision_config=dict(SIGLIP, image_size=[28, 28], patch_size=[14, 14])), {}),
    **{arch: (dict(vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, image_size=28)), text)
       for arch, text in (("glm4v", MROPE), ("glm4v_moe", GLM_MROPE), ("glm46v", GLM_MROPE))},
    # a SigLIP 2 tower of 16 patches of 14 pixels, merged 2x2 (its text model: LFM2's convolution and attention)
    "lfm2_vl": (dict(vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, patch_size=14, num_patches=16),
                     projector_hidden_size=32, downsample_factor=2), dict(layer_types=["conv", "full_attention"])),
}
