//! The protobuf codec of both services: prost's, except that a request the server cannot
//! decode is answered `INVALID_ARGUMENT` (the client sent it; grpc's own servers and tonic say
//! `INTERNAL`, which tells a client developer that the coordinator failed). A response the client
//! cannot decode stays `INTERNAL`.

use std::marker::PhantomData;

use prost::{Message, Name};
use tonic::Status;
use tonic::codec::{DecodeBuf, Decoder};
use tonic_prost::{ProstCodec, ProstEncoder};

/// The fully qualified names of the messages that methods take as requests.
pub const REQUEST_TYPES: &[&str] = include!(concat!(env!("OUT_DIR"), "/request_types.rs"));

/// The codec the generated clients and servers use.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestAwareDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestAwareDecoder(PhantomData)
    }
}

/// Decodes `U` with prost; the status of a failure depends on whether `U` is a request.
#[derive(Debug, Clone)]
pub struct RequestAwareDecoder<U>(PhantomData<U>);

impl<U: Message + Name + Default> Decoder for RequestAwareDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        U::decode(buf).map(Some).map_err(|e| decode_status::<U>(&e))
    }
}

/// The status for a message of type `U` that did not decode.
pub fn decode_status<U: Name>(e: &prost::DecodeError) -> Status {
    let name = U::full_name();
    if REQUEST_TYPES.contains(&name.as_str()) {
        Status::invalid_argument(format!("the request is not a valid {name}: {e}"))
    } else {
        Status::internal(format!("the response is not a valid {name}: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb;

    #[test]
    fn requests_are_the_methods_inputs() {
        assert!(REQUEST_TYPES.contains(&"fedtune.v1.HelloRequest"));
        assert!(REQUEST_TYPES.contains(&"fedtune.v1.SiteRequest"));
        assert!(!REQUEST_TYPES.contains(&"fedtune.v1.HelloResponse"));
        assert!(!REQUEST_TYPES.contains(&"fedtune.v1.ModelChunk"));
    }

    #[test]
    fn a_bad_request_is_the_clients_fault_and_a_bad_response_the_servers() {
        let garbage: &[u8] = &[0xff, 0xff, 0xff];
        let e = pb::HelloRequest::decode(garbage).unwrap_err();
        assert_eq!(decode_status::<pb::HelloRequest>(&e).code(), tonic::Code::InvalidArgument);
        let e = pb::HelloResponse::decode(garbage).unwrap_err();
        assert_eq!(decode_status::<pb::HelloResponse>(&e).code(), tonic::Code::Internal);
    }
}
