//! `#[hub]`: typed hub methods from an `impl` block (re-exported as
//! `ringhub_engine::hub`).
//!
//! Every method of the block that takes `&self` becomes a hub method, called by clients
//! under its name in PascalCase (`join_group` is `JoinGroup`; `#[hub(name = "...")]`
//! renames one), matched case-insensitively as ASP.NET Core does. Its other parameters
//! are the invocation's arguments, decoded with serde from JSON and MessagePack alike,
//! except parameters of type `&Call`, `&Caller` or `&HubContext`, which receive the
//! invocation, its caller and the hub context, and parameters of type
//! `ClientStream<T>`, which receive the streams the client uploads with the call, in
//! order. It may be `async`, and returns anything `Serialize` (`()` answers `null`) or
//! a `Result` of it whose error converts into `HubError`; or a stream, `impl
//! Stream<Item = T>` (or `Item = Result<T, E>`, whose first error ends it), possibly in
//! a `Result`: a streaming method, which clients call with `stream()`. A wrong argument
//! count or type answers a Completion error naming the method, and the connection
//! stays. The attribute writes the `Hub` implementation; methods without `&self` are
//! left alone. (Return types are recognised by their spelling, as a macro sees no
//! types: `Result`, `impl Stream<Item = ...>`.)

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
    /// The next upload stream (`ClientStream<T>`).
    Upload,
    Call,
    Caller,
    Context,
}

fn expand(block: &mut ItemImpl) -> syn::Result<Tokens> {
    let self_ty = &block.self_ty;
    let (impl_generics, _, where_clause) = block.generics.split_for_impl();
    let mut arms = Vec::new();
    let mut stream_arms = Vec::new();
    let mut plain_names = Vec::new();
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
        let (arm, streaming) = dispatch_arm(method, &name)?;
        if streaming {
            stream_arms.push(arm);
            arms.push(quote! {
                if call.method.eq_ignore_ascii_case(#name) {
                    return ::std::result::Result::Err(
                        ::ringhub_engine::HubError::StreamingMethod(call.method.to_owned()),
                    );
                }
            });
        } else {
            arms.push(arm);
            plain_names.push(name.clone());
        }
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

            fn stream<'ringhub>(
                &'ringhub self,
                mut call: ::ringhub_engine::Call<'ringhub>,
            ) -> ::ringhub_engine::LocalBoxFuture<
                'ringhub,
                ::std::result::Result<
                    ::ringhub_engine::ItemStream<'ringhub>,
                    ::ringhub_engine::HubError,
                >,
            > {
                ::std::boxed::Box::pin(async move {
                    #(#stream_arms)*
                    if [#(#plain_names),*].iter().any(|name| call.method.eq_ignore_ascii_case(name)) {
                        return ::std::result::Result::Err(
                            ::ringhub_engine::HubError::NotStreamingMethod(call.method.to_owned()),
                        );
                    }
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
    if let Type::Path(path) = ty {
        if path
            .path
            .segments
            .last()
            .is_some_and(|s| s.ident == "ClientStream")
        {
            return Param::Upload;
        }
    }
    Param::Argument(Box::new(ty.clone()))
}

/// The last segment of a path type (`Result` of `std::result::Result<..>`).
fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(path) => path.path.segments.last(),
        _ => None,
    }
}

/// The first generic argument of a path segment (`T` of `Result<T, E>`).
fn first_type_argument(segment: &syn::PathSegment) -> Option<&Type> {
    match &segment.arguments {
        syn::PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
            syn::GenericArgument::Type(ty) => Some(ty),
            _ => None,
        }),
        _ => None,
    }
}

/// For `impl Stream<Item = X>`: whether X is spelled `Result<..>`.
fn stream_item_is_result(ty: &Type) -> Option<bool> {
    let Type::ImplTrait(bounds) = ty else {
        return None;
    };
    bounds.bounds.iter().find_map(|bound| {
        let syn::TypeParamBound::Trait(bound) = bound else {
            return None;
        };
        let segment = bound.path.segments.last()?;
        if segment.ident != "Stream" {
            return None;
        }
        let syn::PathArguments::AngleBracketed(args) = &segment.arguments else {
            return Some(false);
        };
        Some(args.args.iter().any(|arg| {
            matches!(arg, syn::GenericArgument::AssocType(item)
                if item.ident == "Item" && last_segment(&item.ty).is_some_and(|s| s.ident == "Result"))
        }))
    })
}

/// What a method returns: (a `Result` of it, a stream whose items are `Result`s).
fn return_kind(output: &ReturnType) -> (bool, Option<bool>) {
    let ReturnType::Type(_, ty) = output else {
        return (false, None);
    };
    if let Some(segment) = last_segment(ty).filter(|s| s.ident == "Result") {
        let inner = first_type_argument(segment).and_then(stream_item_is_result);
        return (true, inner);
    }
    (false, stream_item_is_result(ty))
}

/// The dispatch of one method, and whether it is a streaming one.
fn dispatch_arm(method: &ImplItemFn, name: &str) -> syn::Result<(Tokens, bool)> {
    let ident = &method.sig.ident;
    let mut decode = Vec::new();
    let mut pass = Vec::new();
    let mut index = 0usize;
    let mut streams = 0usize;
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
            Param::Upload => {
                let local = syn::Ident::new(&format!("stream_{streams}"), typed.pat.span());
                let ty = &typed.ty;
                decode.push(quote! { let #local: #ty = call.take_stream(#streams)?; });
                pass.push(quote! { #local });
                streams += 1;
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
    let (fallible, stream) = return_kind(&method.sig.output);
    let result = if fallible {
        quote! { #invoked.map_err(::std::convert::Into::<::ringhub_engine::HubError>::into)? }
    } else {
        quote! { #invoked }
    };
    let answer = match stream {
        None => quote! { ::ringhub_engine::Call::encode_result(&result) },
        Some(false) => quote! { ::std::result::Result::Ok(::ringhub_engine::items(result)) },
        Some(true) => {
            quote! { ::std::result::Result::Ok(::ringhub_engine::fallible_items(result)) }
        }
    };
    let arm = quote! {
        if call.method.eq_ignore_ascii_case(#name) {
            call.expect_arguments(#count)?;
            call.expect_streams(#streams)?;
            #(#decode)*
            let result = #result;
            return #answer;
        }
    };
    Ok((arm, stream.is_some()))
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
