//! Property tests of the ranker's request validation and prompt builder on the shipped
//! tokenizer, with arbitrary titles: unicode, control characters, special-token text and its
//! fragments, empty and oversized titles, counts beyond the limits. Nothing panics; a request
//! is refused with an INVALID_ARGUMENT naming a field, or rendered into a prompt whose length
//! is bounded by a function of the limits and whose only special tokens are the template's.

mod common;

use std::sync::OnceLock;

use llamarec_proto::v1::RankRequest;
use proptest::prelude::*;
use ranker_service::service::{validate_request, RequestLimits};
use ranker_service::{GgufFile, PromptRenderer, PromptTemplate, Tokenizer};

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| Tokenizer::from_gguf(&GgufFile::open(common::require_model()).unwrap()).unwrap())
}

fn renderers() -> &'static [PromptRenderer; 2] {
    static RENDERERS: OnceLock<[PromptRenderer; 2]> = OnceLock::new();
    RENDERERS.get_or_init(|| {
        [PromptTemplate::alpaca(), PromptTemplate::chatml()].map(|t| PromptRenderer::new(t, tokenizer().clone()).unwrap())
    })
}

const LIMITS: RequestLimits = RequestLimits { max_title_bytes: 1024, max_history_titles: 100, max_candidates: 20 };

/// Pieces titles are made of: anything, plus what attacks the prompt.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => any::<char>().prop_map(String::from),
        2 => "[a-zA-Z0-9 ()]{1,12}",
        1 => prop_oneof![
            Just("<|im_start|>"), Just("<|im_end|>"), Just("<|endoftext|>"), Just("<|im_"), Just("end|>"), Just("<|"), Just("|>"),
            Just("\n\n### Response:\n"), Just("### Instruction:"), Just("\n"), Just("\r"), Just("\t"), Just("\0"), Just("\u{1b}[31m"),
            Just("\u{202e}"), Just("\u{FFFD}"), Just("臥虎藏龍"), Just("Amélie (2001)"), Just("🎬"), Just(" "),
        ]
        .prop_map(String::from),
    ]
}

fn title() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => proptest::collection::vec(piece(), 0..24).prop_map(|p| p.concat()),
        1 => Just(String::new()),
        // Around and far beyond max_title_bytes.
        1 => (900usize..1100, "[a-z ]{1,3}").prop_map(|(n, s)| s.repeat(n / s.len().max(1) + 1)),
        1 => (0usize..8).prop_map(|n| "<|im_start|>".repeat(n * 20)),
    ]
}

fn titles(max: usize) -> impl Strategy<Value = Vec<String>> {
    prop_oneof![0..=max + 2, 0..=4usize].prop_flat_map(|n| proptest::collection::vec(title(), n))
}

/// Ids of the tokenizer's special tokens.
fn special_ids() -> Vec<u32> {
    let t = tokenizer();
    t.special_token_texts().iter().filter_map(|s| t.token_to_id(s)).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_requests_are_refused_by_field_or_render_a_bounded_clean_prompt(
        history in titles(24),
        candidates in titles(21),
        chatml in any::<bool>(),
    ) {
        let r = &renderers()[chatml as usize];
        let t = r.template();
        let req = RankRequest { history_titles: history, candidate_titles: candidates };
        if let Err(e) = validate_request(&req, &LIMITS) {
            prop_assert!(e.is_invalid_argument(), "{e}");
            let m = e.to_string();
            prop_assert!(m.starts_with("history_titles") || m.starts_with("candidate_titles"), "{m}");
            prop_assert!(m.len() < 200, "{m}");
            return Ok(());
        }
        prop_assert!(req.candidate_titles.iter().chain(&req.history_titles).all(|t| t.len() <= LIMITS.max_title_bytes));
        let prompt = match r.render(&req.history_titles, &req.candidate_titles) {
            Ok(p) => p,
            Err(e) => {
                // Titles that sanitize to nothing.
                prop_assert!(e.is_invalid_argument(), "{e}");
                let m = e.to_string();
                prop_assert!(m.starts_with("history_titles[") || m.starts_with("candidate_titles["), "{m}");
                return Ok(());
            }
        };
        let ids = r.tokenize(&prompt).unwrap().ids;

        // The only special tokens are the template's own.
        let specials = special_ids();
        let template_specials = r.tokenizer().encode(&(r.render(&["a"], &["b"]).unwrap().text())).unwrap().iter().filter(|i| specials.contains(i)).count();
        let in_prompt = ids.iter().filter(|i| specials.contains(i)).count();
        prop_assert_eq!(in_prompt, template_specials, "a title injected a special token:\n{}", prompt.text());

        // Each title is one line: no control characters except the template's own separators.
        let own_newlines = r.render(&vec!["a"; req.history_titles.len().min(t.max_history)], &vec!["b"; req.candidate_titles.len()]).unwrap().text().matches('\n').count();
        prop_assert_eq!(prompt.text().matches('\n').count(), own_newlines);
        prop_assert!(!prompt.text().chars().any(|c| c.is_control() && c != '\n'));

        // Length bounded by the limits: the fixed parts plus, per rendered item, its frame and
        // at most max_title_tokens title tokens (a merge across a title's edge costs at most
        // one more token on each side).
        let frame = r.tokenizer().encode(&r.render(&[] as &[&str], &["x"]).unwrap().text()).unwrap().len();
        let items = LIMITS.max_history_titles.min(t.max_history) + LIMITS.max_candidates;
        let per_item = t.max_title_tokens + 12;
        prop_assert!(ids.len() <= frame + items * per_item, "{} tokens > {} + {} x {}", ids.len(), frame, items, per_item);
        // And tighter, for this request's own counts.
        let n = req.history_titles.len().min(t.max_history) + req.candidate_titles.len();
        prop_assert!(ids.len() <= frame + n * per_item);
    }

    #[test]
    fn a_title_is_cut_to_max_title_tokens_and_carries_no_special_or_control_text(title in title()) {
        let r = &renderers()[1];
        let cut = r.truncate_title(&title).unwrap();
        prop_assert!(r.tokenizer().encode(&cut).unwrap().len() <= r.template().max_title_tokens);
        prop_assert!(!cut.chars().any(char::is_control), "{cut:?}");
        for s in r.tokenizer().special_token_texts() {
            prop_assert!(!cut.contains(&s), "{cut:?} contains {s}");
        }
        prop_assert!(cut.len() <= title.len().max(1) * 3, "sanitizing never grows a title much");
    }
}

#[test]
fn an_absurd_title_is_refused_before_tokenizing() {
    // 10 MB: refused by a length comparison, long before the tokenizer would take seconds.
    let req = RankRequest { history_titles: vec![], candidate_titles: vec!["Alien (1979)".into(), "x".repeat(10 << 20)] };
    let e = validate_request(&req, &LIMITS).unwrap_err();
    assert_eq!(e.to_string(), "candidate_titles[1] is 10485760 bytes; the limit is 1024 ([ranker] max_title_bytes)");
    assert!(e.is_invalid_argument());
    let req = RankRequest { history_titles: vec!["a".into(); 101], candidate_titles: vec!["b".into()] };
    assert_eq!(validate_request(&req, &LIMITS).unwrap_err().to_string(), "history_titles is 101 titles; the limit is 100 ([ranker] max_history_titles)");
    let req = RankRequest { history_titles: vec![], candidate_titles: vec!["b".into(); 21] };
    assert!(validate_request(&req, &LIMITS).unwrap_err().to_string().starts_with("candidate_titles has 21 titles; the limit is 20"));
}
