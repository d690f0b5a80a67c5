package main

import (
	"context"
	"fmt"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/klog/v2"
)

func newClient(kubeconfig string) (*kubernetes.Clientset, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, err
	}
	cfg.QPS, cfg.Burst = 50, 100
	return kubernetes.NewForConfig(cfg)
}

// exited returns the first component failure already reported, if any.
func exited(chans map[string]<-chan error) error {
	for name, ch := range chans {
		select {
		case err := <-ch:
			return fmt.Errorf("%s exited: %v", name, err)
		default:
		}
	}
	return nil
}

// waitReadyz polls /readyz with the admin credentials until it answers 200.
func waitReadyz(ctx context.Context, client *kubernetes.Clientset, apiDone <-chan error) error {
	last := ""
	err := wait.PollUntilContextCancel(ctx, 200*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		if err := exited(map[string]<-chan error{"kube-apiserver": apiDone}); err != nil {
			return false, err
		}
		body, err := client.CoreV1().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil {
			return true, nil
		}
		last = fmt.Sprintf("%v %s", err, body)
		return false, nil
	})
	if err != nil && last != "" {
		return fmt.Errorf("%w (last /readyz: %s)", err, last)
	}
	return err
}

// waitDefaultServiceAccount waits for the default namespace and its default ServiceAccount: the
// latter is made by the controller-manager's serviceaccount controller, so the controllers run.
func waitDefaultServiceAccount(ctx context.Context, client *kubernetes.Clientset, apiDone, kcmDone, schedDone <-chan error) error {
	chans := map[string]<-chan error{"kube-apiserver": apiDone, "kube-controller-manager": kcmDone, "kube-scheduler": schedDone}
	return wait.PollUntilContextCancel(ctx, 200*time.Millisecond, true, func(ctx context.Context) (bool, error) {
		if err := exited(chans); err != nil {
			return false, err
		}
		if _, err := client.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{}); err != nil {
			if !apierrors.IsNotFound(err) {
				klog.V(2).InfoS("default namespace", "err", err)
			}
			return false, nil
		}
		if _, err := client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{}); err != nil {
			return false, nil
		}
		return true, nil
	})
}
