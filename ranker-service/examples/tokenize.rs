//! Prints the token ids and strings of a text under the GGUF tokenizer (debugging aid).
use ranker_service::{GgufFile, Tokenizer};

fn main() {
    let mut args = std::env::args().skip(1);
    let path = args.next().expect("usage: tokenize GGUF TEXT");
    let text = args.next().expect("usage: tokenize GGUF TEXT");
    let tok = Tokenizer::from_gguf(&GgufFile::open(path).unwrap()).unwrap();
    for id in tok.encode(&text).unwrap() {
        println!("{id}\t{:?}", tok.id_to_token(id).unwrap_or_default());
    }
}
