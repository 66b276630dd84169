//! `#[hub]` over an impl block: methods called by their PascalCase names
//! (case-insensitively), arguments decoded from the client's JSON, results encoded,
//! the invocation's caller and context at hand; wrong arity or types answer a
//! Completion error naming the method and the connection stays.

mod common;

use common::{start_with_hub, RawClient};
use ringhub_engine::{hub, Caller, HubContext, HubError, Target};
use serde::Serialize;

struct Typed;

#[derive(Serialize)]
struct Sum {
    total: i64,
    terms: usize,
}

#[hub]
impl Typed {
    fn add(&self, a: i64, b: i64) -> i64 {
        a + b
    }

    async fn sum_all(&self, numbers: Vec<i64>) -> Result<Sum, HubError> {
        if numbers.is_empty() {
            return Err(HubError::exception("Nothing to add."));
        }
        Ok(Sum {
            total: numbers.iter().sum(),
            terms: numbers.len(),
        })
    }

    #[hub(name = "WhoAmI")]
    fn identity(&self, caller: &Caller) -> String {
        caller.connection_id.clone()
    }

    async fn say(
        &self,
        caller: &Caller,
        context: &HubContext,
        text: String,
    ) -> Result<(), HubError> {
        context
            .send(
                &caller.hub,
                Target::All,
                "said",
                vec![caller.connection_id.clone().into(), text.into()],
            )
            .await
            .map_err(|e| HubError::exception(e.to_string()))
    }

    /// Not `&self`: not a hub method.
    fn helper() -> i64 {
        7
    }
}

#[test]
fn typed_methods_are_dispatched_decoded_and_encoded() {
    let server = start_with_hub(|| Typed);
    let mut client = RawClient::connect(server.local_addr(), None);
    assert!(client.invoke("1", "Add", "[2,3]").contains(r#""result":5"#));
    // Names match case-insensitively, as in ASP.NET Core.
    assert!(client
        .invoke("2", "add", "[40,2]")
        .contains(r#""result":42"#));
    let sum = client.invoke("3", "SumAll", "[[1,2,3]]");
    assert!(sum.contains(r#""result":{"total":6,"terms":3}"#), "{sum}");
    let refused = client.invoke("4", "SumAll", "[[]]");
    assert!(
        refused.contains(r#""error":"Nothing to add.""#),
        "{refused}"
    );
    let arity = client.invoke("5", "Add", "[1]");
    assert!(
        arity.contains(r#""error":"Failed to invoke 'Add'"#),
        "{arity}"
    );
    let mistyped = client.invoke("6", "Add", r#"[1,"two"]"#);
    assert!(mistyped.contains("argument 2"), "{mistyped}");
    let me = client.invoke("7", "whoami", "[]");
    assert!(me.contains(r#""result":""#), "{me}");
    let unknown = client.invoke("8", "Helper", "[]");
    assert!(unknown.contains("Unknown hub method"), "{unknown}");
    let said = client.invoke("9", "Say", r#"["hello"]"#);
    assert!(
        said.contains(r#""result":null"#) || said.contains("said"),
        "{said}"
    );
    // The connection stays through every refusal.
    assert!(client
        .invoke("10", "Add", "[1,1]")
        .contains(r#""result":2"#));
    assert_eq!(Typed::helper(), 7);
    server.shutdown();
}
