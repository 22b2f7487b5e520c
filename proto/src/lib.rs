//! The `llamarec.v1` gRPC API shared by the gateway, the retriever and the ranker.

/// Generated messages, clients and servers of package `llamarec.v1`.
pub mod v1 {
    tonic::include_proto!("llamarec.v1");
}

/// Encoded `FileDescriptorSet` of all `llamarec.v1` protos, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/llamarec_descriptor.bin"));

#[cfg(test)]
mod tests {
    use prost::Message;

    #[test]
    fn descriptor_set_describes_all_three_services() {
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).expect("valid descriptor set");
        let services: Vec<String> = set
            .file
            .iter()
            .filter(|f| f.package() == "llamarec.v1")
            .flat_map(|f| f.service.iter().map(|s| s.name().to_string()))
            .collect();
        for wanted in ["Gateway", "Retriever", "Ranker"] {
            assert!(services.iter().any(|s| s == wanted), "{wanted} missing from {services:?}");
        }
        let methods = |service: &str| -> Vec<String> {
            let s = set.file.iter().flat_map(|f| &f.service).find(|s| s.name() == service).unwrap();
            s.method.iter().map(|m| m.name().to_string()).collect()
        };
        assert_eq!(methods("Gateway"), ["Recommend", "AppendEvents", "GetHistory", "GetSplit", "SetSplit"]);
        assert_eq!(methods("Retriever"), ["Retrieve", "RetrieveBatch", "Info", "Reload"]);
        assert_eq!(methods("Ranker"), ["Rank", "Info", "Reload"]);
    }

    #[test]
    fn every_field_is_documented() {
        // Source info survives into the descriptor set; a field without a leading comment is an
        // undocumented part of the public API.
        let set = prost_types::FileDescriptorSet::decode(super::FILE_DESCRIPTOR_SET).unwrap();
        let mut undocumented = Vec::new();
        for file in set.file.iter().filter(|f| f.package() == "llamarec.v1") {
            let Some(info) = &file.source_code_info else { panic!("{} has no source info", file.name()) };
            for (mi, message) in file.message_type.iter().enumerate() {
                for (fi, field) in message.field.iter().enumerate() {
                    // Path of field fi of message mi: [4 (message_type), mi, 2 (field), fi].
                    let path = [4, mi as i32, 2, fi as i32];
                    let documented = info.location.iter().any(|l| l.path == path && !l.leading_comments().trim().is_empty());
                    if !documented {
                        undocumented.push(format!("{}.{}", message.name(), field.name()));
                    }
                }
            }
        }
        assert!(undocumented.is_empty(), "undocumented fields: {undocumented:?}");
    }
}
