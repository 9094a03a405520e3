//! The contract as the compiled descriptor set states it (`ecommerce::proto::FILE_DESCRIPTOR_SET`,
//! the bytes reflection serves): every `ecommerce.v1` method, every message and field with its
//! `google.api.field_behavior`, and requests built from them alone, so that a test walking them
//! covers an RPC or a field added later without being told.
//!
//! prost's own descriptor types drop extensions, so the few descriptor fields needed here are
//! declared below with the option's field number (1052, `google.api.field_behavior`).
//!
//! Also a codec of raw bytes, to call any method by its path with a request built here.

use std::collections::{BTreeMap, HashMap};

use prost::{
    Message as _,
    bytes::{Buf as _, BufMut as _},
    encoding::{WireType, encode_key, encode_varint},
};
use tonic::{
    Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
};

/// The package every method of the contract lives in.
pub const PACKAGE: &str = "ecommerce.v1";

mod descriptor {
    //! The parts of `google/protobuf/descriptor.proto` read here, with the field behaviour
    //! extension that prost_types has no field for.

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FileSet {
        #[prost(message, repeated, tag = "1")]
        pub file: Vec<File>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct File {
        #[prost(string, tag = "2")]
        pub package: String,
        #[prost(message, repeated, tag = "4")]
        pub message_type: Vec<Message>,
        #[prost(message, repeated, tag = "5")]
        pub enum_type: Vec<Enum>,
        #[prost(message, repeated, tag = "6")]
        pub service: Vec<Service>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Message {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, repeated, tag = "2")]
        pub field: Vec<Field>,
        #[prost(message, repeated, tag = "3")]
        pub nested_type: Vec<Message>,
        #[prost(message, repeated, tag = "4")]
        pub enum_type: Vec<Enum>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Field {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(int32, tag = "3")]
        pub number: i32,
        #[prost(int32, tag = "4")]
        pub label: i32,
        #[prost(int32, tag = "5")]
        pub r#type: i32,
        #[prost(string, tag = "6")]
        pub type_name: String,
        #[prost(message, optional, tag = "8")]
        pub options: Option<FieldOptions>,
        #[prost(int32, optional, tag = "9")]
        pub oneof_index: Option<i32>,
        #[prost(bool, tag = "17")]
        pub proto3_optional: bool,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct FieldOptions {
        /// `google.api.field_behavior` (packed or not: prost reads both).
        #[prost(int32, repeated, tag = "1052")]
        pub field_behavior: Vec<i32>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Enum {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, repeated, tag = "2")]
        pub value: Vec<EnumValue>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct EnumValue {
        #[prost(int32, tag = "2")]
        pub number: i32,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Service {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(message, repeated, tag = "2")]
        pub method: Vec<Method>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct Method {
        #[prost(string, tag = "1")]
        pub name: String,
        #[prost(string, tag = "2")]
        pub input_type: String,
        #[prost(string, tag = "3")]
        pub output_type: String,
        #[prost(bool, tag = "5")]
        pub client_streaming: bool,
        #[prost(bool, tag = "6")]
        pub server_streaming: bool,
    }
}

/// `google.api.FieldBehavior` values this contract uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    Optional,
    Required,
    OutputOnly,
    Other(i32),
}

impl From<i32> for Behavior {
    fn from(raw: i32) -> Self {
        match raw {
            1 => Behavior::Optional,
            2 => Behavior::Required,
            3 => Behavior::OutputOnly,
            other => Behavior::Other(other),
        }
    }
}

/// A field's type, as far as building a request needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// int32, int64, uint32, uint64: a varint.
    Integer,
    Bool,
    String,
    Bytes,
    /// The enum's full name.
    Enum(String),
    /// The message's full name.
    Message(String),
    /// A type no request of this contract uses yet (floats, fixed, zigzag); its number.
    Unsupported(i32),
}

#[derive(Clone, Debug)]
pub struct Field {
    pub name: String,
    pub number: u32,
    pub kind: Kind,
    pub repeated: bool,
    /// The oneof this field belongs to (`optional` fields' synthetic oneofs are not counted).
    pub oneof: Option<i32>,
    pub behavior: Vec<Behavior>,
}

impl Field {
    pub fn is(&self, behavior: Behavior) -> bool {
        self.behavior.contains(&behavior)
    }
}

#[derive(Clone, Debug)]
pub struct Method {
    /// `ecommerce.v1.OrderService`.
    pub service: String,
    /// `PlaceOrder`.
    pub name: String,
    pub input: String,
    pub output: String,
    pub streaming: bool,
}

impl Method {
    /// `/ecommerce.v1.OrderService/PlaceOrder`.
    pub fn path(&self) -> String {
        format!("/{}/{}", self.service, self.name)
    }

    /// A read (AIP-131 Get, AIP-132 List): changes nothing, so it is always safe to retry.
    /// Every other method writes.
    pub fn is_read(&self) -> bool {
        self.name.starts_with("Get") || self.name.starts_with("List")
    }
}

/// The whole contract.
pub struct Contract {
    pub methods: Vec<Method>,
    pub messages: BTreeMap<String, Vec<Field>>,
    enums: HashMap<String, Vec<i32>>,
}

impl Contract {
    pub fn load() -> Self {
        Self::from_descriptor_set(ecommerce::proto::FILE_DESCRIPTOR_SET)
    }

    pub fn from_descriptor_set(encoded: &[u8]) -> Self {
        let set = descriptor::FileSet::decode(encoded).expect("a valid descriptor set");
        let mut contract = Contract {
            methods: Vec::new(),
            messages: BTreeMap::new(),
            enums: HashMap::new(),
        };
        for file in &set.file {
            let scope = format!(".{}", file.package);
            for message in &file.message_type {
                contract.add_message(&scope, message);
            }
            for e in &file.enum_type {
                contract.add_enum(&scope, e);
            }
            if file.package != PACKAGE {
                continue;
            }
            for service in &file.service {
                for method in &service.method {
                    contract.methods.push(Method {
                        service: format!("{}.{}", file.package, service.name),
                        name: method.name.clone(),
                        input: method.input_type.clone(),
                        output: method.output_type.clone(),
                        streaming: method.client_streaming || method.server_streaming,
                    });
                }
            }
        }
        assert!(
            !contract.methods.is_empty(),
            "no {PACKAGE} method in the set"
        );
        contract
    }

    fn add_message(&mut self, scope: &str, message: &descriptor::Message) {
        let name = format!("{scope}.{}", message.name);
        for nested in &message.nested_type {
            self.add_message(&name, nested);
        }
        for e in &message.enum_type {
            self.add_enum(&name, e);
        }
        let fields = message
            .field
            .iter()
            .map(|f| Field {
                name: f.name.clone(),
                number: f.number as u32,
                kind: match f.r#type {
                    3 | 4 | 5 | 13 => Kind::Integer,
                    8 => Kind::Bool,
                    9 => Kind::String,
                    12 => Kind::Bytes,
                    14 => Kind::Enum(f.type_name.clone()),
                    11 => Kind::Message(f.type_name.clone()),
                    other => Kind::Unsupported(other),
                },
                repeated: f.label == 3,
                oneof: f.oneof_index.filter(|_| !f.proto3_optional),
                behavior: f
                    .options
                    .as_ref()
                    .map(|o| o.field_behavior.iter().map(|&b| b.into()).collect())
                    .unwrap_or_default(),
            })
            .collect();
        self.messages.insert(name, fields);
    }

    fn add_enum(&mut self, scope: &str, e: &descriptor::Enum) {
        let numbers = e.value.iter().map(|v| v.number).collect();
        self.enums.insert(format!("{scope}.{}", e.name), numbers);
    }

    /// A write whose request carries an `idempotency_key` (AIP-155): retried with the same key,
    /// it returns the first result and changes nothing more.
    #[allow(dead_code)] // tests/deploy_manifests checks the client service config with it
    pub fn is_keyed(&self, method: &Method) -> bool {
        self.fields(&method.input)
            .iter()
            .any(|f| f.name == "idempotency_key")
    }

    pub fn fields(&self, message: &str) -> &[Field] {
        self.messages
            .get(message)
            .unwrap_or_else(|| panic!("{message} is not in the descriptor set"))
    }

    /// Messages of the contract's own package reachable from `roots` through fields.
    pub fn reachable(&self, roots: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        let mut queue: Vec<String> = roots.into_iter().collect();
        while let Some(message) = queue.pop() {
            if seen.contains(&message) || !message.starts_with(&format!(".{PACKAGE}.")) {
                continue;
            }
            for field in self.fields(&message) {
                if let Kind::Message(inner) = &field.kind {
                    queue.push(inner.clone());
                }
            }
            seen.push(message);
        }
        seen
    }

    /// The REQUIRED fields of `message` and of the messages under it that a request may carry:
    /// under REQUIRED fields, under OPTIONAL ones (a message given must be whole), and under each
    /// member of a oneof. Each as the path a request names it by (`items[0].quantity`).
    pub fn required_paths(&self, message: &str) -> Vec<FieldPath> {
        let mut paths = Vec::new();
        self.collect_required(message, &mut FieldPath::default(), &mut paths);
        paths
    }

    fn collect_required(&self, message: &str, prefix: &mut FieldPath, out: &mut Vec<FieldPath>) {
        for field in self.fields(message) {
            if field.is(Behavior::OutputOnly) {
                continue;
            }
            prefix.0.push(Step {
                name: field.name.clone(),
                repeated: field.repeated,
            });
            if field.is(Behavior::Required) {
                out.push(prefix.clone());
            }
            if let Kind::Message(inner) = &field.kind
                && !is_well_known(inner)
                && prefix.0.len() < 8
            {
                self.collect_required(inner, prefix, out);
            }
            prefix.0.pop();
        }
    }

    /// A request for `message` that passes validation as far as the annotations tell: every
    /// REQUIRED field set, OPTIONAL ones left out, the first member of each oneof chosen, and
    /// `omit` left out (with the fields on the way to it set, oneof members included).
    ///
    /// Values: integers 1 (`user_id`: `user`, so that calls spread over users), strings `"x"`,
    /// `true`, an enum's first non-zero value, one element for a repeated field, and timestamps
    /// a day apart in field order (so a window's start comes before its end).
    pub fn request(&self, message: &str, omit: Option<&FieldPath>, user: i64) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(message, omit.map(|p| p.0.as_slice()), user, &mut out);
        out
    }

    fn encode(&self, message: &str, omit: Option<&[Step]>, user: i64, out: &mut Vec<u8>) {
        if message == ".google.protobuf.Timestamp" {
            return;
        }
        let fields = self.fields(message);
        let mut oneofs_chosen: Vec<i32> = Vec::new();
        // The oneof member on the omitted path is the one chosen for its oneof.
        if let Some([step, ..]) = omit
            && let Some(f) = fields.iter().find(|f| f.name == step.name)
            && let Some(o) = f.oneof
        {
            oneofs_chosen.push(o);
        }
        for field in fields {
            let on_path =
                omit.and_then(|steps| steps.first()).map(|s| &s.name) == Some(&field.name);
            let rest = omit.filter(|_| on_path).map(|steps| &steps[1..]);
            if rest.is_some_and(<[Step]>::is_empty) {
                continue; // the omitted field itself
            }
            let first_of_its_oneof = field.oneof.is_some_and(|o| !oneofs_chosen.contains(&o));
            let wanted = on_path || field.is(Behavior::Required) || first_of_its_oneof;
            if !wanted || field.is(Behavior::OutputOnly) {
                continue;
            }
            if let Some(o) = field.oneof {
                oneofs_chosen.push(o);
            }
            self.encode_field(field, rest, user, out);
        }
    }

    fn encode_field(&self, field: &Field, rest: Option<&[Step]>, user: i64, out: &mut Vec<u8>) {
        let n = field.number;
        match &field.kind {
            Kind::Integer => {
                let value = if field.name == "user_id" { user } else { 1 };
                encode_key(n, WireType::Varint, out);
                encode_varint(value as u64, out);
            }
            Kind::Bool => {
                encode_key(n, WireType::Varint, out);
                encode_varint(1, out);
            }
            Kind::String | Kind::Bytes => put_bytes(n, b"x", out),
            Kind::Enum(name) => {
                let first = self.enums[name]
                    .iter()
                    .copied()
                    .find(|&v| v != 0)
                    .unwrap_or_else(|| panic!("{name} has no value but 0"));
                encode_key(n, WireType::Varint, out);
                encode_varint(first as u64, out);
            }
            Kind::Message(name) if name == ".google.protobuf.Timestamp" => {
                let mut ts = Vec::new();
                encode_key(1, WireType::Varint, &mut ts);
                encode_varint(1_700_000_000 + 86_400 * u64::from(n), &mut ts);
                put_bytes(n, &ts, out);
            }
            Kind::Message(name) => {
                let mut inner = Vec::new();
                self.encode(name, rest, user, &mut inner);
                put_bytes(n, &inner, out);
            }
            Kind::Unsupported(t) => panic!(
                "field {} has descriptor type {t}, which the request builder does not fill yet",
                field.name
            ),
        }
    }
}

fn put_bytes(number: u32, bytes: &[u8], out: &mut Vec<u8>) {
    encode_key(number, WireType::LengthDelimited, out);
    encode_varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// Types defined by protobuf itself, whose fields carry no annotation of ours.
pub fn is_well_known(message: &str) -> bool {
    message.starts_with(".google.protobuf.")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    name: String,
    repeated: bool,
}

/// A field inside a request, from the top: `discount.fixed.amount`, `items[0].quantity`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldPath(Vec<Step>);

impl std::fmt::Display for FieldPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, step) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(".")?;
            }
            f.write_str(&step.name)?;
            // The element a built request carries, for every repeated field on the way but
            // the last (a missing list is named by the list).
            if step.repeated && i + 1 < self.0.len() {
                f.write_str("[0]")?;
            }
        }
        Ok(())
    }
}

/// Messages as bytes, both ways: the caller encodes, the test reads what it needs.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut bytes = vec![0; src.remaining()];
        src.copy_to_slice(&mut bytes);
        Ok(Some(bytes))
    }
}

/// Calls `method` with `request` on `channel`, with `authorization: Bearer <token>` (sent to
/// every method: only AdminService reads it).
pub async fn call(
    channel: tonic::transport::Channel,
    method: &Method,
    request: Vec<u8>,
    token: &str,
    timeout: Option<std::time::Duration>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let mut request = tonic::Request::new(request);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("ascii token"),
    );
    if let Some(timeout) = timeout {
        request.set_timeout(timeout);
    }
    let path = method.path().parse().expect("a method path");
    grpc.unary(request, path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}
