//! A hub of the embedder's own takes and returns its own serde types: arguments decoded
//! with `Call::decode_arg`, results with `Call::encode_result`; a mistyped argument is
//! the method's Completion error and the connection stays.

mod common;

use common::{start_with_hub, RawClient};
use ringhub_engine::{Call, Hub, HubError, LocalBoxFuture, Value};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Admission {
    patient: String,
    ward: String,
    beds_needed: u32,
    notes: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Confirmation {
    patient: String,
    bed: String,
    notes: Vec<String>,
}

struct Wards;

impl Hub for Wards {
    fn invoke<'a>(&'a self, mut call: Call<'a>) -> LocalBoxFuture<'a, Result<Value, HubError>> {
        Box::pin(async move {
            match call.method {
                "Admit" => {
                    let admission: Admission = call.decode_arg(0)?;
                    let priority: u8 = call.decode_arg(1)?;
                    Call::encode_result(&Confirmation {
                        bed: format!("{}-{}", admission.ward, admission.beds_needed),
                        patient: admission.patient,
                        notes: admission
                            .notes
                            .into_iter()
                            .chain([format!("priority {priority}")])
                            .collect(),
                    })
                }
                other => Err(HubError::UnknownMethod(other.to_owned())),
            }
        })
    }
}

#[test]
fn a_custom_hub_takes_and_returns_its_own_types() {
    let server = start_with_hub(|| Wards);
    let mut client = RawClient::connect(server.local_addr(), None);
    let answer = client.invoke(
        "1",
        "Admit",
        r#"[{"patient":"p-1","ward":"7b","bedsNeeded":2,"notes":"fall risk"},3]"#,
    );
    assert!(
        answer.contains(
            r#""result":{"patient":"p-1","bed":"7b-2","notes":["fall risk","priority 3"]}"#
        ),
        "{answer}"
    );
    // Wrong types: a Completion error naming the method and the argument.
    let wrong = client.invoke(
        "2",
        "Admit",
        r#"[{"patient":"p-2","ward":"7b","bedsNeeded":"two"},3]"#,
    );
    assert!(
        wrong.contains(r#""error":"Failed to invoke 'Admit'"#),
        "{wrong}"
    );
    assert!(wrong.contains("argument 1"), "{wrong}");
    let out_of_range = client.invoke(
        "3",
        "Admit",
        r#"[{"patient":"p-2","ward":"7b","bedsNeeded":1},300]"#,
    );
    assert!(out_of_range.contains("argument 2"), "{out_of_range}");
    let missing = client.invoke(
        "4",
        "Admit",
        r#"[{"patient":"p-2","ward":"7b","bedsNeeded":1}]"#,
    );
    assert!(missing.contains("argument 2 is missing"), "{missing}");
    // The connection stays.
    let again = client.invoke(
        "5",
        "Admit",
        r#"[{"patient":"p-3","ward":"1a","bedsNeeded":1},1]"#,
    );
    assert!(again.contains(r#""bed":"1a-1""#), "{again}");
    server.shutdown();
}
