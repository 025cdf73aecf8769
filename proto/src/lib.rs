//! Generated gRPC code for the public API (`ouroboros.v1`) and the internal draft and
//! target protocols, plus the descriptor set that the services' reflection serves.

pub mod common {
    pub mod v1 {
        tonic::include_proto!("ouroboros.common.v1");
    }
}

pub mod target {
    pub mod v1 {
        tonic::include_proto!("ouroboros.target.v1");
    }
}

pub mod draft {
    pub mod v1 {
        tonic::include_proto!("ouroboros.draft.v1");
    }
}

pub mod v1 {
    tonic::include_proto!("ouroboros.v1");
}

/// Encoded `FileDescriptorSet` of every `.proto` here, for tonic-reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("ouroboros_descriptor");

pub mod convert;
pub mod validate;
