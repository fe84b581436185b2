//! Derives `Plugin::events` from the handler methods an `impl Plugin for T` block defines, so a
//! plugin's NRI subscription can never disagree with the handlers it actually has.

use proc_macro::TokenStream;
use quote::quote;
use syn::{ImplItem, ItemImpl, parse_macro_input};

/// Handler method name → `nri_plugin::Event` variant. Configure, Synchronize and Shutdown are
/// not events: the runtime always calls them.
const HANDLERS: &[(&str, &str)] = &[
    ("run_pod_sandbox", "RunPodSandbox"),
    ("stop_pod_sandbox", "StopPodSandbox"),
    ("remove_pod_sandbox", "RemovePodSandbox"),
    ("create_container", "CreateContainer"),
    ("post_create_container", "PostCreateContainer"),
    ("start_container", "StartContainer"),
    ("post_start_container", "PostStartContainer"),
    ("update_container", "UpdateContainer"),
    ("post_update_container", "PostUpdateContainer"),
    ("stop_container", "StopContainer"),
    ("remove_container", "RemoveContainer"),
    ("update_pod_sandbox", "UpdatePodSandbox"),
    ("post_update_pod_sandbox", "PostUpdatePodSandbox"),
];

/// Put on `impl nri_plugin::Plugin for T { ... }`. Adds `fn events(&self)` returning the set of
/// events whose handlers the block defines, unless the block defines `events` itself.
#[proc_macro_attribute]
pub fn plugin(attr: TokenStream, item: TokenStream) -> TokenStream {
    if !attr.is_empty() {
        return syn::Error::new(
            proc_macro2::Span::call_site(),
            "#[nri_plugin::plugin] takes no arguments",
        )
        .to_compile_error()
        .into();
    }
    let mut block = parse_macro_input!(item as ItemImpl);
    let defined: Vec<String> = block
        .items
        .iter()
        .filter_map(|item| match item {
            ImplItem::Fn(f) => Some(f.sig.ident.to_string()),
            _ => None,
        })
        .collect();
    if defined.iter().any(|name| name == "events") {
        return quote!(#block).into();
    }
    let events: Vec<proc_macro2::TokenStream> = HANDLERS
        .iter()
        .filter(|(method, _)| defined.iter().any(|d| d == method))
        .map(|(_, variant)| {
            let ident = syn::Ident::new(variant, proc_macro2::Span::call_site());
            quote!(::nri_plugin::Event::#ident)
        })
        .collect();
    let method: ImplItem = syn::parse_quote! {
        fn events(&self) -> ::nri_plugin::EventSet {
            ::nri_plugin::EventSet::of(&[#(#events),*])
        }
    };
    block.items.push(method);
    quote!(#block).into()
}
