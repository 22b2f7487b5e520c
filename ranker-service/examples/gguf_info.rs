//! Prints the metadata and tensor table of a GGUF file (debugging aid).
use candle_core::quantized::gguf_file;

fn main() {
    let path = std::env::args().nth(1).expect("usage: gguf_info FILE");
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = gguf_file::Content::read(&mut f).unwrap();
    let mut keys: Vec<_> = ct.metadata.keys().collect();
    keys.sort();
    for k in keys {
        let v = &ct.metadata[k];
        let s = format!("{v:?}");
        println!("{k} = {}", &s[..s.len().min(200)]);
    }
    let mut names: Vec<_> = ct.tensor_infos.iter().collect();
    names.sort_by_key(|(k, _)| k.to_string());
    for (name, info) in names.iter().take(20) {
        println!("{name}: {:?} {:?}", info.ggml_dtype, info.shape);
    }
}
