//! Pinned encodings of the shipped model's tokenizer, built from its GGUF metadata.
//!
//! The ids are checked against the GGUF vocabulary itself (`tokenizer.ggml.tokens`): e.g.
//! "A" must be one token whose vocabulary string is "A", and " A" one token whose string is
//! "ĠA" (byte-level BPE writes a space as "Ġ").

mod common;

use std::sync::OnceLock;

use ranker_service::{GgufFile, Tokenizer};

use common::require_model;

fn tokenizer() -> &'static Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| Tokenizer::from_gguf(&GgufFile::open(require_model()).unwrap()).unwrap())
}

fn id(tok: &Tokenizer, s: &str) -> u32 {
    tok.token_to_id(s)
        .unwrap_or_else(|| panic!("{s:?} not in vocab"))
}

#[test]
fn letters_are_single_tokens_49_to_68() {
    let tok = tokenizer();
    for (i, c) in ('A'..='T').enumerate() {
        let s = c.to_string();
        assert_eq!(tok.encode(&s).unwrap(), vec![49 + i as u32], "{s}");
        assert_eq!(tok.id_to_token(49 + i as u32).unwrap(), s);
    }
}

#[test]
fn space_letters_are_other_single_tokens() {
    let tok = tokenizer();
    for c in 'A'..='T' {
        let ids = tok.encode(&format!(" {c}")).unwrap();
        assert_eq!(ids.len(), 1, " {c}");
        assert_eq!(ids[0], id(tok, &format!("Ġ{c}")));
        assert!(!(49..=68).contains(&ids[0]));
    }
}

#[test]
fn control_tokens_are_parsed_as_one_id_without_leading_space() {
    let tok = tokenizer();
    assert_eq!(tok.encode("<|endoftext|>").unwrap(), vec![0]);
    assert_eq!(tok.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(tok.encode("<|im_end|>").unwrap(), vec![2]);
    // candle's GGUF helper would give " user" here.
    assert_eq!(
        tok.encode("<|im_start|>user").unwrap(),
        vec![1, id(tok, "user")]
    );
    assert_eq!(
        tok.encode("<|im_start|>assistant\nB<|im_end|>").unwrap(),
        // "assistant" is not in this vocabulary: BPE ends at "ass" + "istant".
        vec![1, id(tok, "ass"), id(tok, "istant"), id(tok, "Ċ"), 50, 2]
    );
    assert_eq!(tok.bos_id(), Some(1));
    assert_eq!(tok.eos_id(), Some(2));
}

#[test]
fn digits_are_split_individually() {
    let tok = tokenizer();
    let digits: Vec<u32> = "2024".chars().map(|c| id(tok, &c.to_string())).collect();
    assert_eq!(tok.encode("2024").unwrap(), digits);
    // A space before digits stays a token of its own ("Ġ"): digits never merge with it.
    let mut spaced = vec![id(tok, "Ġ")];
    spaced.extend(&digits);
    assert_eq!(tok.encode(" 2024").unwrap(), spaced);
    assert_eq!(
        tok.encode("(1995)").unwrap(),
        vec![
            id(tok, "("),
            id(tok, "1"),
            id(tok, "9"),
            id(tok, "9"),
            id(tok, "5"),
            id(tok, ")")
        ]
    );
}

#[test]
fn words_follow_gpt2_pre_tokenization() {
    let tok = tokenizer();
    assert_eq!(
        tok.encode("Hello world").unwrap(),
        vec![id(tok, "Hello"), id(tok, "Ġworld")]
    );
    assert_eq!(
        tok.encode("### Response:\n").unwrap(),
        vec![
            id(tok, "###"),
            id(tok, "ĠResponse"),
            id(tok, ":"),
            id(tok, "Ċ")
        ]
    );
}

#[test]
fn decode_inverts_encode() {
    let tok = tokenizer();
    let texts = [
        "The Godfather (1972)",
        "  leading spaces and trailing  ",
        "tabs\tand\nnewlines\n\n",
        "Amélie (Le fabuleux destin d'Amélie Poulain) (2001)",
        "Crouching Tiger, Hidden Dragon (臥虎藏龍) 🐯🐉",
        "Ça va? Ñandú — “quotes” … 100% & <tags> 3.14159",
        "<|im_start|>system\nYou are helpful<|im_end|>\n",
        "Ελληνικά кириллица العربية हिन्दी",
    ];
    for t in texts {
        let ids = tok.encode(t).unwrap();
        assert_eq!(tok.decode(&ids).unwrap(), t);
    }
}

#[test]
fn tokenizer_json_round_trips_through_a_file() {
    let gguf = GgufFile::open(require_model()).unwrap();
    let json = Tokenizer::gguf_to_tokenizer_json(&gguf).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, serde_json::to_vec(&json).unwrap()).unwrap();
    let from_file = Tokenizer::from_file(&path).unwrap();
    let text = "<|im_start|>user\nUser history: (1) Toy Story (1995); \n (A) Heat (1995)";
    assert_eq!(
        from_file.encode(text).unwrap(),
        tokenizer().encode(text).unwrap()
    );
    assert_eq!(from_file.vocab_size(), 49152);
}
