#!/usr/bin/env python3
"""Processor and tokenizer files for the tiny VL fixture (gpu_tiny: vocab 512, vision patch 2, merge 2, temporal 2),
written into a COPY of the source checkpoint (never into tests/fixtures/data: the goldens hash converted outputs).
m3-convert copies them to the output byte for byte, as it copies a real checkpoint's tokenizer and processor files.

What reads them (issue 24 item 4):
* vLLM 0.33 (models/minimax_m3/common/mm_preprocess.py, transformers_utils/processors/minimax_m3.py): its vendored
  MiniMaxVLProcessor loads the tokenizer (AutoTokenizer) and MiniMaxM3VLImageProcessor / VideoProcessor
  .from_pretrained; it needs the tokens ``]<]image[>[``, ``]<]video[>[``, ``]<]start of image[>[`` and
  ``]<]end of image[>[`` in the vocabulary, ``patch_size`` / ``merge_size`` / ``temporal_patch_size`` of the vision
  tower, and ``max_pixels`` small enough that the profiling image (isqrt(max_pixels) square) fits max_model_len.
  Its smart_resize uses a fixed min_pixels of 56*56 for images.
* transformers 5.19 MiniMaxM3VLProcessor (processing_minimax_m3_vl.py): the same four tokens; its image processor
  reads ``size`` {shortest_edge: min_pixels, longest_edge: max_pixels}.
Both give the same pixel_values and placeholder count for an image whose area is within [min_pixels, max_pixels]
and whose sides are multiples of patch_size * merge_size (no resize on either side).

Token ids: 0 <unk>, 1 <s>, 2 </s>, 3..499 "t3".."t499" (word level, split on whitespace), 500 ]<]image[>[
(= config image_token_index), 501 ]<]video[>[ (= video_token_index), 502 / 503 start / end of image, 504..511 unused.

    python gpu/vl_processor.py DIR      # writes the files into DIR
"""
import json
import os
import sys

VOCAB = 512
IMAGE, VIDEO = "]<]image[>[", "]<]video[>["
START, END = "]<]start of image[>[", "]<]end of image[>["
SPECIAL = {0: "<unk>", 1: "<s>", 2: "</s>", 500: IMAGE, 501: VIDEO, 502: START, 503: END}
PATCH, MERGE, TEMPORAL = 2, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 64 * 64     # vLLM's fixed image min_pixels; 64x64 = 256 tokens at most
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def token(i):
    return SPECIAL.get(i, f"t{i}" if 3 <= i < 500 else f"<extra_{i}>")


def text_of(ids):
    """The prompt text whose tokenization is ``ids`` (text tokens 3..499 and the image token)."""
    return " ".join(token(i) for i in ids)


def tokenizer_json():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from tokenizers import AddedToken
    tok = Tokenizer(models.WordLevel({token(i): i for i in range(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(token(i), special=True, normalized=False) for i in sorted(SPECIAL)])
    return tok.to_str()


def image_processor_config(video=False):
    cfg = {"processor_class": "MiniMaxM3VLProcessor", "patch_size": PATCH, "merge_size": MERGE,
           "temporal_patch_size": TEMPORAL, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS,
           "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, "do_resize": True, "resample": 3,
           "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": CLIP_MEAN,
           "image_std": CLIP_STD, "do_convert_rgb": True}
    if video:
        cfg.update(video_processor_type="MiniMaxM3VLVideoProcessor", do_sample_frames=False)
    else:
        cfg["image_processor_type"] = "MiniMaxM3VLImageProcessor"
    return cfg


def write(d):
    files = {
        "tokenizer.json": tokenizer_json(),
        "tokenizer_config.json": json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "processor_class": "MiniMaxM3VLProcessor",
            "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "model_max_length": 1024,
            "clean_up_tokenization_spaces": False}, indent=1),
        "special_tokens_map.json": json.dumps({"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}, indent=1),
        "preprocessor_config.json": json.dumps(image_processor_config(), indent=1),
        "video_preprocessor_config.json": json.dumps(image_processor_config(video=True), indent=1),
        "processor_config.json": json.dumps({"processor_class": "MiniMaxM3VLProcessor"}, indent=1),
    }
    for name, text in files.items():
        with open(os.path.join(d, name), "w") as f:
            f.write(text + "\n")
    return sorted(files)


if __name__ == "__main__":
    print("wrote", ", ".join(write(sys.argv[1])))
