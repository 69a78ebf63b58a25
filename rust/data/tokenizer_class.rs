//! Which pipeline transformers builds for a model folder's tokenizer.
//!
//! transformers 5 (`AutoTokenizer.from_pretrained`) does not simply trust the
//! `tokenizer_class` of tokenizer_config.json: the model's `model_type` (config.json) can
//! override it. A folder declaring `LlamaTokenizer` gets transformers' SentencePiece-style
//! Llama pipeline rebuilt around the vocabulary, except when its model type is one whose
//! hub declaration transformers knows to be wrong or maps to its generic backend
//! (Phi-3, Mistral, Mixtral, Qwen2, ...): then tokenizer.json is loaded as written. The
//! two differ on leading spaces, so following the wrong one trains on tokens the model
//! never sees at inference.

use std::borrow::Cow;

use serde_json::Value as Json;

/// How the tokenizer.json of a folder is turned into a tokenizer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipeline {
    /// transformers' `LlamaTokenizer`: Metaspace rebuilt from `legacy` / `add_prefix_space`,
    /// BOS / EOS from `add_bos_token` / `add_eos_token` (BOS on by default).
    SentencePieceLlama,
    /// transformers' `GPT2Tokenizer`: no normalizer and a plain ByteLevel pre-tokenizer
    /// (`add_prefix_space` from the config), whatever tokenizer.json holds (SmolLM2's
    /// single-digit split is dropped).
    Gpt2ByteLevel,
    /// tokenizer.json as written (transformers' `TokenizersBackend` and its subclasses);
    /// explicit `add_bos_token` / `add_eos_token` still replace its post-processor.
    AsWritten,
}

/// Model types for which transformers 5.x ignores a hub `LlamaTokenizer` declaration:
/// `MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS` plus the types whose registered tokenizer
/// is a generic backend (`TokenizersBackend`, `MistralCommonBackend`, ...). A test checks
/// this list against the installed transformers.
pub const TOKENIZER_JSON_AS_WRITTEN: [&str; 90] = [
    "EvollaModel",
    "arctic",
    "aria",
    "beam",
    "bigbird_pegasus",
    "canary",
    "chatlm",
    "cohere_asr",
    "ernie4_5",
    "ernie4_5_moe",
    "flex_olmo",
    "fuyu",
    "glm",
    "glm4",
    "glm4_moe",
    "glm4_moe_lite",
    "glm4v",
    "glm4v_moe",
    "glm_image",
    "glmasr",
    "got_ocr2",
    "gpt_bigcode",
    "gradium_phonon_tts",
    "granite",
    "granitemoe",
    "granitemoehybrid",
    "granitemoeshared",
    "h2ovl_chat",
    "hyperclovax",
    "hyperclovax_vision_v2",
    "hyperclovax_vlm",
    "internlm2",
    "internlm3",
    "iquestcoder",
    "jamba",
    "kimi_k25",
    "kimi_linear",
    "kosmos-2",
    "llava",
    "llava_next",
    "mimo_v2_flash",
    "minicpm3",
    "minicpm_ocr",
    "minicpmv",
    "minicpmv4_6",
    "minicpmv4_7",
    "minimax_m2",
    "ministral",
    "ministral3",
    "mistral",
    "mistral3",
    "mistral_large4",
    "mixtral",
    "modernbert",
    "modernbert-decoder",
    "molmo",
    "molmo2",
    "nemo_speechlm",
    "nemotron",
    "nvfp4",
    "nystromformer",
    "olmo2",
    "olmo3",
    "olmo_hybrid",
    "omniasr",
    "opencua",
    "openvla",
    "paddleocr_vl",
    "pegasus_x",
    "persimmon",
    "phi3",
    "phi3_v",
    "phimoe",
    "pix2struct",
    "pixtral",
    "pocket_tts",
    "qwen2",
    "qwen3_5",
    "qwen3_5_moe",
    "qwen3_5_moe_text",
    "qwen4_exp",
    "siglip2",
    "smolvlm",
    "stablelm",
    "step3_vl",
    "umt5",
    "vipllava",
    "voxtral",
    "voxtral_realtime",
    "xlm-roberta-xl",
];

/// The pipeline transformers builds from `tokenizer_config` (tokenizer_config.json),
/// `model_config` (config.json; Null when absent) and the tokenizer.json bytes.
pub fn pipeline(tokenizer_config: &Json, model_config: &Json, tokenizer_json: &[u8]) -> Pipeline {
    let declared = tokenizer_config
        .get("tokenizer_class")
        .or_else(|| model_config.get("tokenizer_class"))
        .and_then(Json::as_str)
        .unwrap_or_default();
    let model_type = model_config
        .get("model_type")
        .and_then(Json::as_str)
        .unwrap_or_default();
    if TOKENIZER_JSON_AS_WRITTEN.contains(&model_type) {
        return Pipeline::AsWritten;
    }
    let byte_level = memchr::memmem::find(tokenizer_json, b"\"ByteLevel\"").is_some();
    match declared.trim_end_matches("Fast") {
        // Byte-level files declared as Llama (Llama 3 derivatives) keep their pipeline.
        "LlamaTokenizer" if !byte_level => Pipeline::SentencePieceLlama,
        "GPT2Tokenizer" => Pipeline::Gpt2ByteLevel,
        _ => Pipeline::AsWritten,
    }
}

/// The tokenizer.json bytes with the parts transformers' class replaces on load put in
/// place (an owned copy only where something changes).
pub fn as_loaded<'a>(
    pipeline: Pipeline,
    tokenizer_json: &'a [u8],
    config: &Json,
) -> serde_json::Result<Cow<'a, [u8]>> {
    if pipeline != Pipeline::Gpt2ByteLevel {
        return Ok(Cow::Borrowed(tokenizer_json));
    }
    let mut file: Json = serde_json::from_slice(tokenizer_json)?;
    let add_prefix_space = config
        .get("add_prefix_space")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    file["normalizer"] = Json::Null;
    file["pre_tokenizer"] = serde_json::json!({
        "type": "ByteLevel",
        "add_prefix_space": add_prefix_space,
        "trim_offsets": true,
        "use_regex": true,
    });
    serde_json::to_vec(&file).map(Cow::Owned)
}

/// Whether transformers puts BOS / EOS around one sequence, when its tokenizer class
/// overrides the post-processor of tokenizer.json (None: the file's own one stands).
pub fn bos_eos(
    pipeline: Pipeline,
    config: &Json,
    has_post_processor: bool,
) -> Option<(bool, bool)> {
    let flag = |name: &str| config.get(name).and_then(Json::as_bool);
    let (bos, eos) = (flag("add_bos_token"), flag("add_eos_token"));
    match pipeline {
        Pipeline::SentencePieceLlama => Some((bos.unwrap_or(true), eos.unwrap_or(false))),
        _ if bos.is_some() || eos.is_some() || !has_post_processor => {
            Some((bos.unwrap_or(false), eos.unwrap_or(false)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SPM: &[u8] = br#"{"pre_tokenizer": null, "normalizer": {"type": "Prepend"}}"#;
    const BYTE_LEVEL: &[u8] = br#"{"pre_tokenizer": {"type": "ByteLevel"}}"#;

    #[test]
    fn model_type_overrides_a_llama_declaration() {
        let declared = json!({"tokenizer_class": "LlamaTokenizer"});
        let none = Json::Null;
        assert_eq!(
            pipeline(&declared, &none, SPM),
            Pipeline::SentencePieceLlama
        );
        let llama = json!({"model_type": "llama"});
        assert_eq!(
            pipeline(&declared, &llama, SPM),
            Pipeline::SentencePieceLlama
        );
        for t in ["phi3", "mistral", "mixtral"] {
            let cfg = json!({ "model_type": t });
            assert_eq!(pipeline(&declared, &cfg, SPM), Pipeline::AsWritten, "{t}");
        }
        assert_eq!(pipeline(&declared, &llama, BYTE_LEVEL), Pipeline::AsWritten);
        let gpt2 = json!({"tokenizer_class": "GPT2Tokenizer"});
        assert_eq!(pipeline(&gpt2, &llama, BYTE_LEVEL), Pipeline::Gpt2ByteLevel);
        let qwen2 = json!({ "model_type": "qwen2" });
        assert_eq!(pipeline(&gpt2, &qwen2, BYTE_LEVEL), Pipeline::AsWritten);
        let from_model = json!({"model_type": "llama", "tokenizer_class": "LlamaTokenizerFast"});
        assert_eq!(
            pipeline(&none, &from_model, SPM),
            Pipeline::SentencePieceLlama
        );
    }

    #[test]
    fn gpt2_class_gets_a_plain_byte_level_pre_tokenizer() {
        let file = br#"{"normalizer": {"type": "NFC"}, "pre_tokenizer": {"type": "Sequence"}}"#;
        let loaded = as_loaded(Pipeline::Gpt2ByteLevel, file, &Json::Null).unwrap();
        let loaded: Json = serde_json::from_slice(&loaded).unwrap();
        assert!(loaded["normalizer"].is_null());
        assert_eq!(loaded["pre_tokenizer"]["type"], "ByteLevel");
        assert!(matches!(
            as_loaded(Pipeline::AsWritten, file, &Json::Null).unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn explicit_flags_replace_the_post_processor() {
        let cfg = json!({"add_bos_token": false});
        assert_eq!(
            bos_eos(Pipeline::AsWritten, &cfg, true),
            Some((false, false))
        );
        assert_eq!(bos_eos(Pipeline::AsWritten, &Json::Null, true), None);
        assert_eq!(
            bos_eos(Pipeline::AsWritten, &Json::Null, false),
            Some((false, false))
        );
        assert_eq!(
            bos_eos(Pipeline::SentencePieceLlama, &Json::Null, true),
            Some((true, false))
        );
    }
}
