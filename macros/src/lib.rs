//! `#[hub]`: typed hub methods from an `impl` block (re-exported as
//! `ringhub_engine::hub`).
//!
//! Every method of the block that takes `&self` becomes a hub method, called by clients
//! under its name in PascalCase (`join_group` is `JoinGroup`; `#[hub(name = "...")]`
//! renames one), matched case-insensitively as ASP.NET Core does. Its other parameters
//! are the invocation's arguments, decoded with serde from JSON and MessagePack alike,
//! except parameters of type `&Call`, `&Caller` or `&HubContext`, which receive the
//! invocation, its caller and the hub context. It may be `async`, and returns anything
//! `Serialize` (`()` answers `null`) or a `Result` of it whose error converts into
//! `HubError`. A wrong argument count or type answers a Completion error naming the
//! method, and the connection stays. The attribute writes the `Hub` implementation;
//! methods without `&self` are left alone.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as Tokens};
use quote::quote;
use syn::{
    parse_macro_input, spanned::Spanned, FnArg, ImplItem, ImplItemFn, ItemImpl, LitStr, Pat,
    ReturnType, Type,
};

/// See the crate documentation.
#[proc_macro_attribute]
pub fn hub(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            Span::call_site(),
            "#[hub] takes no arguments on the impl block",
        )
        .to_compile_error()
        .into();
    }
    let mut block = parse_macro_input!(item as ItemImpl);
    match expand(&mut block) {
        Ok(dispatch) => quote!(#block #dispatch).into(),
        Err(error) => error.to_compile_error().into(),
    }
}

/// What the invocation hands a parameter.
enum Param {
    /// The next argument, decoded as this type.
    Argument(Box<Type>),
    Call,
    Caller,
    Context,
}

fn expand(block: &mut ItemImpl) -> syn::Result<Tokens> {
    let self_ty = &block.self_ty;
    let (impl_generics, _, where_clause) = block.generics.split_for_impl();
    let mut arms = Vec::new();
    let mut names = Vec::new();
    for item in &mut block.items {
        let ImplItem::Fn(method) = item else {
            continue;
        };
        if !takes_self_by_ref(method) {
            continue;
        }
        let name = client_name(method)?;
        if names.iter().any(|n: &String| n.eq_ignore_ascii_case(&name)) {
            return Err(syn::Error::new(
                method.sig.ident.span(),
                format!("two hub methods are called '{name}' (names match case-insensitively)"),
            ));
        }
        arms.push(dispatch_arm(method, &name)?);
        names.push(name);
    }
    Ok(quote! {
        impl #impl_generics ::ringhub_engine::Hub for #self_ty #where_clause {
            fn invoke<'ringhub>(
                &'ringhub self,
                mut call: ::ringhub_engine::Call<'ringhub>,
            ) -> ::ringhub_engine::LocalBoxFuture<
                'ringhub,
                ::std::result::Result<::ringhub_engine::Value, ::ringhub_engine::HubError>,
            > {
                ::std::boxed::Box::pin(async move {
                    #(#arms)*
                    ::std::result::Result::Err(::ringhub_engine::HubError::UnknownMethod(
                        call.method.to_owned(),
                    ))
                })
            }
        }
    })
}

fn takes_self_by_ref(method: &ImplItemFn) -> bool {
    matches!(method.sig.inputs.first(), Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_none())
}

/// The name clients call: `#[hub(name = "...")]` (removed from the method), else the
/// Rust name in PascalCase.
fn client_name(method: &mut ImplItemFn) -> syn::Result<String> {
    let mut renamed = None;
    let mut error = None;
    method.attrs.retain(|attr| {
        if !attr.path().is_ident("hub") {
            return true;
        }
        let parsed = attr.parse_nested_meta(|meta| {
            if meta.path.is_ident("name") {
                renamed = Some(meta.value()?.parse::<LitStr>()?.value());
                Ok(())
            } else {
                Err(meta.error("expected `name = \"...\"`"))
            }
        });
        if let Err(e) = parsed {
            error = Some(e);
        }
        false
    });
    if let Some(error) = error {
        return Err(error);
    }
    Ok(renamed.unwrap_or_else(|| pascal_case(&method.sig.ident.to_string())))
}

fn pascal_case(name: &str) -> String {
    name.split('_')
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars
                .next()
                .map(|first| first.to_uppercase().chain(chars).collect::<String>())
                .unwrap_or_default()
        })
        .collect()
}

fn param_of(ty: &Type) -> Param {
    if let Type::Reference(reference) = ty {
        if let Type::Path(path) = &*reference.elem {
            match path
                .path
                .segments
                .last()
                .map(|s| s.ident.to_string())
                .as_deref()
            {
                Some("Call") => return Param::Call,
                Some("Caller") => return Param::Caller,
                Some("HubContext") => return Param::Context,
                _ => {}
            }
        }
    }
    Param::Argument(Box::new(ty.clone()))
}

/// Whether the declared return type is a `Result` (its error is propagated).
fn returns_result(output: &ReturnType) -> bool {
    match output {
        ReturnType::Default => false,
        ReturnType::Type(_, ty) => matches!(&**ty, Type::Path(path)
            if path.path.segments.last().is_some_and(|s| s.ident == "Result")),
    }
}

fn dispatch_arm(method: &ImplItemFn, name: &str) -> syn::Result<Tokens> {
    let ident = &method.sig.ident;
    let mut decode = Vec::new();
    let mut pass = Vec::new();
    let mut index = 0usize;
    for input in method.sig.inputs.iter().skip(1) {
        let FnArg::Typed(typed) = input else {
            return Err(syn::Error::new(input.span(), "unexpected receiver"));
        };
        if !matches!(&*typed.pat, Pat::Ident(_) | Pat::Wild(_)) {
            return Err(syn::Error::new(
                typed.pat.span(),
                "hub method parameters must be plain names",
            ));
        }
        match param_of(&typed.ty) {
            Param::Argument(ty) => {
                let local = syn::Ident::new(&format!("argument_{index}"), typed.pat.span());
                decode.push(quote! { let #local: #ty = call.decode_arg(#index)?; });
                pass.push(quote! { #local });
                index += 1;
            }
            Param::Call => pass.push(quote! { &call }),
            Param::Caller => pass.push(quote! { call.caller }),
            Param::Context => pass.push(quote! { call.context }),
        }
    }
    let count = index;
    let invoked = if method.sig.asyncness.is_some() {
        quote! { self.#ident(#(#pass),*).await }
    } else {
        quote! { self.#ident(#(#pass),*) }
    };
    let result = if returns_result(&method.sig.output) {
        quote! { #invoked.map_err(::std::convert::Into::<::ringhub_engine::HubError>::into)? }
    } else {
        quote! { #invoked }
    };
    Ok(quote! {
        if call.method.eq_ignore_ascii_case(#name) {
            call.expect_arguments(#count)?;
            #(#decode)*
            let result = #result;
            return ::ringhub_engine::Call::encode_result(&result);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::pascal_case;

    #[test]
    fn rust_names_become_pascal_case() {
        assert_eq!(pascal_case("join_group"), "JoinGroup");
        assert_eq!(pascal_case("add"), "Add");
        assert_eq!(pascal_case("send_to_group_2"), "SendToGroup2");
        assert_eq!(pascal_case("_private_ish"), "PrivateIsh");
    }
}
