//! The benchmark corpus and the tokenizer it is measured with.
//!
//! The corpus follows `shared/bench/make_corpus.py`: OpenAI `messages` rows with 1-3 turns
//! (one turn most often), an optional system prompt, user turns ~ lognormal(3.3, 0.9) words
//! and assistant turns ~ lognormal(5.2, 0.9) words (mean ~250), capped at 1500 / 3000,
//! built from a fixed word list. It is generated here, deterministically, from a seed.

use std::path::PathBuf;

const WORDS: &str = "the of and to in is that for it as with was on be at by this had not are but from or have an they which \
one you were her all she there would their we him been has when who will more no if out so said what up its \
about into than them can only other new some could time these two may then do first any my now such like our \
over man me even most made after also did many before must through back years where much your way well down \
should because each just those people how too little state good very make world still own see men work long \
get here between both life being under never day same another know while last might us great old year off \
come since against go came right used take three river mountain python rust model training gradient tensor \
kernel memory adapter quantization template tokenizer dataset packing sequence attention layer weight";

/// SplitMix64: small, fast and deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn random(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }

    fn gauss(&mut self, mu: f64, sigma: f64) -> f64 {
        let (u1, u2) = (self.random().max(f64::MIN_POSITIVE), self.random());
        mu + sigma * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.next() as usize % items.len()]
    }
}

fn sentence(rng: &mut Rng, words: &[&str], n: usize) -> String {
    let mut out: Vec<String> = (0..n).map(|_| rng.pick(words).to_string()).collect();
    let mut first = out[0].chars();
    out[0] = first
        .next()
        .map(|c| c.to_uppercase().chain(first).collect())
        .unwrap_or_default();
    let end = *rng.pick(&[".", ".", ".", "?", "!"]);
    out.join(" ") + end
}

fn text(rng: &mut Rng, words: &[&str], n_words: usize) -> String {
    let mut out = Vec::new();
    let mut left = n_words as isize;
    while left > 0 {
        let k = (left as usize).min(rng.int(6, 20));
        out.push(sentence(rng, words, k));
        left -= k as isize;
    }
    out.join(" ")
}

/// `n` JSONL rows of the benchmark corpus.
pub fn corpus(n: usize, seed: u64) -> Vec<u8> {
    let words: Vec<&str> = WORDS.split_whitespace().collect();
    let mut rng = Rng(seed);
    let mut out = Vec::new();
    for _ in 0..n {
        let mut messages = Vec::new();
        if rng.random() < 0.3 {
            let k = rng.int(5, 30);
            messages
                .push(serde_json::json!({"role": "system", "content": text(&mut rng, &words, k)}));
        }
        for _ in 0..*rng.pick(&[1, 1, 1, 2, 3]) {
            let user = (rng.gauss(3.3, 0.9).exp().min(1500.0) as usize) + 3;
            messages
                .push(serde_json::json!({"role": "user", "content": text(&mut rng, &words, user)}));
            let answer = (rng.gauss(5.2, 0.9).exp().min(3000.0) as usize) + 3;
            messages.push(
                serde_json::json!({"role": "assistant", "content": text(&mut rng, &words, answer)}),
            );
        }
        serde_json::to_writer(&mut out, &serde_json::json!({ "messages": messages }))
            .expect("JSON");
        out.push(b'\n');
    }
    out
}

/// The Llama 3.2 tokenizer folder from shared/ (BACKPROPAGATE_SHARED overrides), if present.
pub fn llama3_tokenizer() -> Option<PathBuf> {
    let shared = std::env::var_os("BACKPROPAGATE_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("shared")
        });
    let dir = shared.join("tokenizers").join("llama-3.2-3b-instruct");
    dir.join("tokenizer.json").exists().then_some(dir)
}
