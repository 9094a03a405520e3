//! Field behaviour (AIP-203): every request field says whether it is REQUIRED or OPTIONAL and
//! every response field is OUTPUT_ONLY, as `google.api.field_behavior`; reflection serves the
//! annotations; and the server's validation agrees with them: each RPC called with each REQUIRED
//! field missing answers INVALID_ARGUMENT naming that field.
//!
//! Everything is walked from the compiled descriptor set, so an RPC, a message or a field added
//! to the protos later is held to the same rules without being listed here.

use std::collections::BTreeSet;

use futures::StreamExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tonic::Code;
use tonic_reflection::pb::v1alpha::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use tonic_types::StatusExt;

use crate::support::{
    ADMIN_TOKEN,
    contract::{Behavior, Contract, call, is_well_known},
    spawn_app,
};

/// RPCs with a rule across fields that no field's behaviour can state (each field is OPTIONAL
/// alone): a request with none of their OPTIONAL fields is refused.
const RULES_ACROSS_FIELDS: &[&str] = &[
    // Exactly one of `event_ids` and `all`.
    "/ecommerce.v1.AdminService/RedriveEvents",
];

#[test]
fn every_field_states_its_behavior() {
    let contract = Contract::load();
    let requests = contract.reachable(contract.methods.iter().map(|m| m.input.clone()));
    let responses = contract.reachable(contract.methods.iter().map(|m| m.output.clone()));
    let mut wrong = Vec::new();
    for (message, fields) in &contract.messages {
        let in_request = requests.contains(message);
        if !in_request && !responses.contains(message) {
            continue;
        }
        for field in fields {
            let name = format!("{message}.{}", field.name);
            let input = field.is(Behavior::Required) as u8 + field.is(Behavior::Optional) as u8;
            if in_request && (input != 1 || field.is(Behavior::OutputOnly)) {
                wrong.push(format!(
                    "{name} (read in a request): must be exactly one of REQUIRED and OPTIONAL, \
                     is {:?}",
                    field.behavior
                ));
            }
            if !in_request && !field.is(Behavior::OutputOnly) {
                wrong.push(format!(
                    "{name} (only in responses): must be OUTPUT_ONLY, is {:?}",
                    field.behavior
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "fields without the right google.api.field_behavior (add \
         `[(google.api.field_behavior) = ...]` and a comment with its range and default):\n{}",
        wrong.join("\n")
    );
}

/// grpcurl 1.8 asks reflection v1alpha; the files it gets carry the annotations (tonic-reflection
/// serves the compiled bytes as they are, custom options included).
#[sqlx::test(migrations = false)]
async fn reflection_serves_the_annotations(_: PgPoolOptions, db: PgConnectOptions) {
    let app = spawn_app(db).await;
    let contract = Contract::load();
    let mut reflection = ServerReflectionClient::new(app.channel.clone());
    for method in &contract.methods {
        let symbol = method.input.trim_start_matches('.').to_string();
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(symbol.clone())),
        };
        let mut answers = reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect("reflection answers")
            .into_inner();
        let answer = answers.next().await.expect("an answer").expect("no error");
        let Some(MessageResponse::FileDescriptorResponse(files)) = answer.message_response else {
            panic!("{symbol}: {answer:?}");
        };
        // The files as one descriptor set (field 1, repeated).
        let mut set = Vec::new();
        for file in &files.file_descriptor_proto {
            prost::encoding::bytes::encode(1, file, &mut set);
        }
        let served = Contract::from_descriptor_set(&set);
        assert_eq!(
            served
                .fields(&method.input)
                .iter()
                .map(|f| &f.behavior)
                .collect::<Vec<_>>(),
            contract
                .fields(&method.input)
                .iter()
                .map(|f| &f.behavior)
                .collect::<Vec<_>>(),
            "{symbol} as reflection serves it"
        );
    }
    app.stop().await;
}

#[sqlx::test(migrations = false)]
async fn a_missing_required_field_is_invalid_argument_naming_it(
    _: PgPoolOptions,
    db: PgConnectOptions,
) {
    let app = spawn_app(db).await;
    let contract = Contract::load();
    let mut wrong = Vec::new();
    let mut checked = BTreeSet::new();
    for method in contract.methods.iter().filter(|m| !m.streaming) {
        assert!(!is_well_known(&method.input));
        let path = method.path();
        // With every REQUIRED field, the request passes validation.
        let whole = contract.request(&method.input, None, 1);
        let answer = call(app.channel.clone(), method, whole, ADMIN_TOKEN, None).await;
        if let Err(status) = &answer
            && status.code() == Code::InvalidArgument
            && !RULES_ACROSS_FIELDS.contains(&path.as_str())
        {
            wrong.push(format!(
                "{path} with every REQUIRED field set is refused: a field the server needs is not \
                 annotated REQUIRED? {status:?}"
            ));
        }
        for missing in contract.required_paths(&method.input) {
            let field = missing.to_string();
            checked.insert(format!("{path} {field}"));
            let request = contract.request(&method.input, Some(&missing), 1);
            let answer = call(app.channel.clone(), method, request, ADMIN_TOKEN, None).await;
            let named = answer.as_ref().err().and_then(|status| {
                let info = status.get_details_error_info()?;
                let violation = status.get_details_bad_request()?;
                let violated = violation.field_violations.first()?.field.clone();
                Some((
                    status.code(),
                    info.reason,
                    info.metadata.get("field")?.clone(),
                    violated,
                ))
            });
            let expected = (
                Code::InvalidArgument,
                "INVALID_FIELD".to_string(),
                field.clone(),
                field.clone(),
            );
            if named.as_ref() != Some(&expected) {
                wrong.push(format!(
                    "{path} without REQUIRED {field}: expected INVALID_ARGUMENT naming it, got \
                     {answer:?}"
                ));
            }
        }
    }
    eprintln!("{} REQUIRED fields checked", checked.len());
    assert!(checked.len() >= 30, "{checked:?}");
    assert!(
        wrong.is_empty(),
        "the server and the annotations disagree:\n{}",
        wrong.join("\n")
    );
    app.stop().await;
}
